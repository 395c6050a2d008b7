package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
)

func TestPrecedenceFlagEnvDevFileDefault(t *testing.T) {
	home := t.TempDir()
	require.NoError(t, WriteDevEnv(home, [][2]string{
		{"LLORCH_TEMPORAL_ADDRESS", "127.0.0.1:1111"},
		{"LLORCH_TEMPORAL_NAMESPACE", "from-dev-file"},
		{"LLORCH_S3_BUCKET", "dev-bucket"},
	}))
	info, err := os.Stat(DevEnvFile(home))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm(), "dev.env holds secrets")

	t.Setenv("LLORCH_TEMPORAL_NAMESPACE", "from-env")
	var tc Temporal
	var s3 S3
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	AddTemporalFlags(fs, &tc)
	AddS3Flags(fs, &s3)
	BindEnv(fs, nil)
	require.NoError(t, fs.Parse([]string{"--s3-bucket", "from-flag"}))
	require.NoError(t, Apply(fs, home))
	require.Equal(t, "127.0.0.1:1111", tc.Address, "dev file beats the default")
	require.Equal(t, "from-env", tc.Namespace, "env beats the dev file")
	require.Equal(t, "from-flag", s3.Bucket, "flag beats everything")
	require.Equal(t, "us-east-1", s3.Region, "default when nothing is set")
	require.Contains(t, fs.Lookup("temporal-address").Usage, "LLORCH_TEMPORAL_ADDRESS")
}

func TestApplyRejectsBadEnvValue(t *testing.T) {
	t.Setenv("LLORCH_TEMPORAL_TLS", "maybe")
	var tc Temporal
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	AddTemporalFlags(fs, &tc)
	BindEnv(fs, nil)
	require.NoError(t, fs.Parse(nil))
	require.ErrorContains(t, Apply(fs, ""), "LLORCH_TEMPORAL_TLS")
}

func TestBindEnv(t *testing.T) {
	t.Setenv("LLORCH_HOME", "/from-env")
	var home, addr, gcBudget, id string
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	AddHomeFlag(fs, &home, "state dir")
	fs.StringVar(&addr, "addr", "", "listen address")
	fs.StringVar(&gcBudget, "gc-budget", "0", "disk budget")
	fs.StringVar(&id, "id", "", "model id")
	BindEnv(fs, map[string]string{"addr": "LLORCH_API_ADDR"}, "id")
	got := map[string]string{}
	fs.VisitAll(func(f *pflag.Flag) { got[f.Name] = EnvVar(f) })
	require.Equal(t, map[string]string{"home": "", "addr": "LLORCH_API_ADDR", "gc-budget": "LLORCH_GC_BUDGET", "id": ""}, got)
	require.Equal(t, "/from-env", home, "--home takes LLORCH_HOME through its default")
	require.Equal(t, "state dir (env LLORCH_HOME)", fs.Lookup("home").Usage)
	require.Equal(t, "disk budget (env LLORCH_GC_BUDGET)", fs.Lookup("gc-budget").Usage)
	require.Equal(t, "model id", fs.Lookup("id").Usage)
	require.PanicsWithValue(t, "config: no flag iid", func() { BindEnv(fs, nil, "iid") })
	require.PanicsWithValue(t, "config: no flag adr", func() { BindEnv(fs, map[string]string{"adr": "X"}) })
}

func TestTemporalClientOptions(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	plain, err := Temporal{Address: "a:7233", Namespace: "ns"}.ClientOptions(log, "id")
	require.NoError(t, err)
	require.Nil(t, plain.ConnectionOptions.TLS)
	require.Nil(t, plain.Credentials)
	require.Equal(t, "ns", plain.Namespace)
	require.IsType(t, &client.GrpcCompressionGzip{}, plain.ConnectionOptions.GrpcCompression, "the SDK's default")
	none, err := Temporal{Compression: "none"}.ClientOptions(log, "id")
	require.NoError(t, err)
	require.IsType(t, &client.GrpcCompressionNone{}, none.ConnectionOptions.GrpcCompression)
	_, err = Temporal{Compression: "zstd"}.ClientOptions(log, "id")
	require.ErrorContains(t, err, "--temporal-grpc-compression: want gzip or none")

	withKey, err := Temporal{Address: "x.tmprl.cloud:7233", APIKey: "k"}.ClientOptions(log, "id")
	require.NoError(t, err)
	require.NotNil(t, withKey.ConnectionOptions.TLS, "an API key implies TLS")
	require.NotNil(t, withKey.Credentials)

	dir := t.TempDir()
	cert, key := writeSelfSigned(t, dir)
	mtls, err := Temporal{ClientCert: cert, ClientKey: key, CACert: cert, ServerName: "temporal.internal"}.ClientOptions(log, "id")
	require.NoError(t, err)
	require.Len(t, mtls.ConnectionOptions.TLS.Certificates, 1)
	require.NotNil(t, mtls.ConnectionOptions.TLS.RootCAs)
	require.Equal(t, "temporal.internal", mtls.ConnectionOptions.TLS.ServerName)

	_, err = Temporal{ClientCert: cert}.ClientOptions(log, "id")
	require.ErrorContains(t, err, "both --temporal-tls-cert and --temporal-tls-key")
	_, err = Temporal{CACert: filepath.Join(dir, "missing.pem")}.ClientOptions(log, "id")
	require.ErrorContains(t, err, "--temporal-tls-ca")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "junk.pem"), []byte("junk"), 0o600))
	_, err = Temporal{CACert: filepath.Join(dir, "junk.pem")}.ClientOptions(log, "id")
	require.ErrorContains(t, err, "no PEM certificate")
}

func writeSelfSigned(t *testing.T, dir string) (certPath, keyPath string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "llorch-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	require.NoError(t, err)
	kb, err := x509.MarshalECPrivateKey(k)
	require.NoError(t, err)
	certPath, keyPath = filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	require.NoError(t, os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600))
	return certPath, keyPath
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1GiB": 1 << 30, "1.5TB": 1.5e12, "1MiB": 1 << 20} {
		n, err := ParseBytes("--disk-margin", in)
		require.NoError(t, err, in)
		require.Equal(t, want, n, in)
	}
	_, err := ParseBytes("--gc-budget", "lots")
	require.EqualError(t, err, `--gc-budget "lots": want a size such as 500GiB`)
}
