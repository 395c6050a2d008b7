package config

import (
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/testcerts"
)

func secretFlags(t *testing.T, args ...string) (*pflag.FlagSet, *string) {
	t.Helper()
	var token string
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	AddSecret(fs, &token, "api-token", "bearer token")
	fs.String("addr", "", "listen address")
	BindEnv(fs, nil)
	require.NoError(t, fs.Parse(args))
	return fs, &token
}

func TestSecretFromEnvFileOrDevEnv(t *testing.T) {
	home := t.TempDir()
	require.NoError(t, WriteDevEnv(home, [][2]string{{"LLORCH_API_TOKEN", "from-dev-file"}}))
	fs, token := secretFlags(t)
	require.NoError(t, Apply(fs, home))
	require.Equal(t, "from-dev-file", *token, "dev.env supplies a secret")

	t.Setenv("LLORCH_API_TOKEN", "from-env")
	fs, token = secretFlags(t)
	require.NoError(t, Apply(fs, home))
	require.Equal(t, "from-env", *token, "env beats dev.env")

	file := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(file, []byte("from-file\r\n"), 0o600))
	t.Setenv("LLORCH_API_TOKEN", "")
	t.Setenv("LLORCH_API_TOKEN_FILE", file)
	fs, token = secretFlags(t)
	require.NoError(t, Apply(fs, home))
	require.Equal(t, "from-file", *token, "the file's trailing newline is no part of the secret")
	v, err := ReadSecret("LLORCH_API_TOKEN")
	require.NoError(t, err)
	require.Equal(t, "from-file", v)

	require.Equal(t, []Secret{{Name: "api-token", Env: "LLORCH_API_TOKEN",
		Usage: "bearer token"}}, Secrets(fs))
	require.True(t, fs.Lookup("api-token").Hidden, "--help lists no flag for a secret")
	require.Empty(t, EnvVar(fs.Lookup("api-token")), "BindEnv leaves the secret's flag alone")
}

func TestSecretErrors(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("LLORCH_API_TOKEN", "a")
	t.Setenv("LLORCH_API_TOKEN_FILE", filepath.Join(dir, "t"))
	fs, _ := secretFlags(t)
	require.EqualError(t, Apply(fs, ""), "both LLORCH_API_TOKEN and LLORCH_API_TOKEN_FILE are set in the environment: set one")

	t.Setenv("LLORCH_API_TOKEN", "")
	fs, _ = secretFlags(t)
	err := Apply(fs, "")
	require.ErrorContains(t, err, "LLORCH_API_TOKEN_FILE: cannot read the secret")
	require.ErrorContains(t, err, filepath.Join(dir, "t"))

	require.NoError(t, os.WriteFile(filepath.Join(dir, "t"), []byte("\n"), 0o600))
	fs, _ = secretFlags(t)
	require.EqualError(t, Apply(fs, ""), "LLORCH_API_TOKEN_FILE: "+filepath.Join(dir, "t")+" is empty")
}

// A secret on the command line is refused, naming the env var to use, and
// the error does not repeat the secret (it would land in logs).
func TestSecretFlagRefused(t *testing.T) {
	t.Setenv("LLORCH_API_TOKEN", "from-env")
	fs, token := secretFlags(t, "--api-token", "hunter2", "--addr", "x")
	err := Apply(fs, "")
	require.EqualError(t, err, "--api-token: secrets are not taken from the command line (every local user reads it in ps and /proc): "+
		"set LLORCH_API_TOKEN, or LLORCH_API_TOKEN_FILE to a file holding it")
	require.NotContains(t, err.Error(), "hunter2")
	require.Empty(t, *token)
}

func TestServerTLSConfig(t *testing.T) {
	_, err := ServerTLS{}.Config()
	require.NoError(t, err)
	var st ServerTLS
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	AddServerTLSFlags(fs, &st, "link-tls", "the node link")
	require.NoError(t, fs.Parse([]string{"--link-tls-cert", "c.pem"}))
	_, err = st.Config()
	require.EqualError(t, err, "TLS needs both --link-tls-cert and --link-tls-key")
	st.Key = filepath.Join(t.TempDir(), "missing.pem")
	_, err = st.Config()
	require.ErrorContains(t, err, "--link-tls-cert/--link-tls-key")

	ca := testcerts.NewCA(t)
	st.Cert, st.Key = ca.Issue(t)
	cfg, err := st.Config()
	require.NoError(t, err)
	require.Equal(t, uint16(tls.VersionTLS12), cfg.MinVersion)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	client, err := ClientTLS("--api-ca", ca.File)
	require.NoError(t, err)
	serial := func() string {
		conn, err := tls.Dial("tcp", ln.Addr().String(), client)
		require.NoError(t, err)
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	first := serial()

	// A renewed certificate written over the files is served without a
	// restart.
	cert2, key2 := ca.Issue(t)
	for src, dst := range map[string]string{cert2: st.Cert, key2: st.Key} {
		b, err := os.ReadFile(src)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(dst, b, 0o600))
		later := time.Now().Add(2 * time.Second)
		require.NoError(t, os.Chtimes(dst, later, later))
	}
	require.Eventually(t, func() bool { return serial() != first }, 10*time.Second, 100*time.Millisecond)

	// Old clients are refused.
	_, err = tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.Pool(), MaxVersion: tls.VersionTLS11})
	require.Error(t, err)
	_, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
}

func TestClientTLS(t *testing.T) {
	cfg, err := ClientTLS("--link-ca", "")
	require.NoError(t, err)
	require.Nil(t, cfg)
	_, err = ClientTLS("--link-ca", filepath.Join(t.TempDir(), "none.pem"))
	require.ErrorContains(t, err, "--link-ca")
	junk := filepath.Join(t.TempDir(), "junk.pem")
	require.NoError(t, os.WriteFile(junk, []byte("junk"), 0o600))
	_, err = ClientTLS("--link-ca", junk)
	require.ErrorContains(t, err, "--link-ca: no PEM certificate in "+junk)

	base := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 7}}
	require.Same(t, base, WithClientTLS(base, nil))
	ca := testcerts.NewCA(t)
	cfg, err = ClientTLS("--link-ca", ca.File)
	require.NoError(t, err)
	c := WithClientTLS(base, cfg)
	tr := c.Transport.(*http.Transport)
	require.Same(t, cfg, tr.TLSClientConfig)
	require.Equal(t, 7, tr.MaxIdleConnsPerHost, "the base transport's settings stay")
	if b := base.Transport.(*http.Transport).TLSClientConfig; b != nil {
		require.Nil(t, b.RootCAs, "base is not changed")
	}
}
