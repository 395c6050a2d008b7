package devcluster

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/config"
)

// Keys of dev.env. They are the env names of the matching flags of the other
// llorch commands, so config.Apply feeds them in as lower-precedence defaults.
const (
	envToken               = "LLORCH_API_TOKEN"
	envLinkToken           = "LLORCH_LINK_TOKEN"
	envTemporal            = "LLORCH_TEMPORAL_ADDRESS"
	envTemporalCompression = "LLORCH_TEMPORAL_GRPC_COMPRESSION"
	envS3Endpoint          = "LLORCH_S3_ENDPOINT"
	envS3Access            = "LLORCH_S3_ACCESS_KEY"
	envS3Secret            = "LLORCH_S3_SECRET_KEY"
	envS3Bucket            = "LLORCH_S3_BUCKET"
	envAPIURL              = "LLORCH_API_URL"
	envCodecKeys           = codec.EnvKeys
)

// State is what a dev cluster keeps across runs.
type State struct {
	Home      string // absolute
	Token     string
	LinkToken string // the node links' cluster secret
	AccessKey string
	SecretKey string
	// CodecKeys encrypt the cluster's Temporal payloads (codec.EnvKeys).
	CodecKeys string
}

// Setup creates the state dir and writes dev.env. Secrets are made on the
// first run and read back on later ones: a token that changed on every start
// would break every shell that exported it and every script that uses it.
// Addresses are rewritten every run, since the ports may have changed.
func Setup(cfg Config) (State, error) {
	home, err := filepath.Abs(cfg.Home)
	if err != nil {
		return State{}, err
	}
	// 0700: the dir holds the S3 data and dev.env, which holds the secrets.
	if err := os.MkdirAll(home, 0o700); err != nil {
		return State{}, fmt.Errorf("create state dir: %w", err)
	}
	old, err := config.ReadDevEnv(home)
	if err != nil {
		return State{}, fmt.Errorf("read %s: %w", config.DevEnvFile(home), err)
	}
	st := State{Home: home, Token: old[envToken], LinkToken: old[envLinkToken], AccessKey: old[envS3Access], SecretKey: old[envS3Secret]}
	for _, s := range []struct {
		v *string
		n int
	}{{&st.Token, 32}, {&st.LinkToken, 32}, {&st.AccessKey, 10}, {&st.SecretKey, 20}} {
		if *s.v == "" {
			if *s.v, err = randomHex(s.n); err != nil {
				return State{}, err
			}
		}
	}
	// S3 access keys are conventionally upper case; it also keeps the key
	// visibly different from the secret in the file.
	st.AccessKey = strings.ToUpper(st.AccessKey)
	// The dev cluster runs encrypted, like production should; the key is
	// made once (payloads recorded under it must stay readable).
	if st.CodecKeys = old[envCodecKeys]; st.CodecKeys == "" {
		st.CodecKeys = codec.NewKey("dev1")
	}
	err = config.WriteDevEnv(home, [][2]string{
		{envToken, st.Token},
		{envLinkToken, st.LinkToken},
		{envTemporal, hostPort(cfg.TemporalPort)},
		// Everything is on this host: gzip would only cost CPU.
		{envTemporalCompression, "none"},
		{envS3Endpoint, hostPort(cfg.S3Port)},
		{envS3Access, st.AccessKey},
		{envS3Secret, st.SecretKey},
		{envS3Bucket, cfg.Bucket},
		{envAPIURL, "http://" + hostPort(cfg.APIPort)},
		{envCodecKeys, st.CodecKeys},
	})
	if err != nil {
		return State{}, fmt.Errorf("write %s: %w", config.DevEnvFile(home), err)
	}
	return st, nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	return hex.EncodeToString(b), nil
}

func hostPort(p int) string { return "127.0.0.1:" + strconv.Itoa(p) }

// lockHome takes an exclusive lock on the state dir for the life of the
// process. Two `llorch dev` on one state dir would share one SQLite file and
// one S3 tree; with non-default ports the port check would not catch that.
// flock is released by the kernel when the process dies, however it dies, so
// a stale lock cannot outlive a crash.
func lockHome(home string) (release func(), err error) {
	path := filepath.Join(home, "dev.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		return nil, fmt.Errorf("another `llorch dev` (pid %s) is running with state dir %s: stop it, or use another --home",
			strings.TrimSpace(string(b)), home)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { _ = f.Close() }, nil
}
