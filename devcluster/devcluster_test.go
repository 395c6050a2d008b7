package devcluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

// freePorts returns n distinct free ports below the kernel's ephemeral range.
// Ports from net.Listen(":0") come from that range, and so do the ports the
// Temporal dev server picks for its internal services at start; a port of
// ours taken from the same pool could be grabbed by Temporal before our
// apiserver or worker binds it. Below the range only an explicit bind can
// take a port.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil {
				lo = v
			}
		}
	}
	base := max(lo-12000, 1024)
	seen := map[int]bool{}
	var out []int
	for tries := 0; len(out) < n && tries < 10000; tries++ {
		p := base + rand.IntN(lo-base)
		if seen[p] {
			continue
		}
		seen[p] = true
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		out = append(out, p)
	}
	require.Len(t, out, n, "could not find free ports")
	return out
}

func portsConfig(t *testing.T) Config {
	p := freePorts(t, 5)
	return Config{Home: t.TempDir(), TemporalPort: p[0], UIPort: p[1], S3Port: p[2], APIPort: p[3], WorkerMetricsPort: p[4]}.WithDefaults()
}

func TestCheckPortsNamesPortUseAndFlag(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	taken := ln.Addr().(*net.TCPAddr).Port

	for _, tc := range []struct {
		set  func(*Config)
		what string
		flag string
	}{
		{func(c *Config) { c.TemporalPort = taken }, "Temporal gRPC", "--temporal-port"},
		{func(c *Config) { c.UIPort = taken }, "Temporal UI", "--ui-port"},
		{func(c *Config) { c.S3Port = taken }, "S3", "--s3-port"},
		{func(c *Config) { c.APIPort = taken }, "REST API", "--api-port"},
		{func(c *Config) { c.WorkerMetricsPort = taken }, "worker metrics", "--worker-metrics-port"},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			cfg := portsConfig(t)
			require.NoError(t, cfg.CheckPorts())
			tc.set(&cfg)
			err := cfg.CheckPorts()
			require.Error(t, err)
			assert.Contains(t, err.Error(), fmt.Sprintf("port %d (%s) is in use: pick another with %s", taken, tc.what, tc.flag))
		})
	}
}

func TestCheckPortsRejectsOnePortForTwoUses(t *testing.T) {
	cfg := portsConfig(t)
	cfg.WorkerMetricsPort = cfg.APIPort
	err := cfg.CheckPorts()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--api-port")
	assert.Contains(t, err.Error(), "--worker-metrics-port")
}

func TestRunFailsOnTakenPortBeforeStartingAnything(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	cfg := portsConfig(t)
	cfg.APIPort = ln.Addr().(*net.TCPAddr).Port
	// Binaries that would fail loudly if they were run at all.
	cfg.TemporalBin, cfg.VersitygwBin, cfg.Exe = "/bin/false", "/bin/false", "/bin/false"
	var out strings.Builder
	err = Run(context.Background(), cfg, &out)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "(REST API) is in use: pick another with --api-port")
	assert.NotContains(t, out.String(), "starting")
}

func TestSetupReusesSecrets(t *testing.T) {
	cfg := portsConfig(t)
	first, err := Setup(cfg)
	require.NoError(t, err)
	assert.Regexp(t, `^[0-9a-f]{64}$`, first.Token)
	assert.NotEmpty(t, first.AccessKey)
	assert.NotEmpty(t, first.SecretKey)

	fi, err := os.Stat(config.DevEnvFile(cfg.Home))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "dev.env holds secrets")

	cfg.APIPort++ // addresses follow the flags of the latest run
	second, err := Setup(cfg)
	require.NoError(t, err)
	assert.Equal(t, first, second, "a second run reuses token and keys")

	env, err := config.ReadDevEnv(cfg.Home)
	require.NoError(t, err)
	assert.Equal(t, first.Token, env["LLORCH_API_TOKEN"])
	assert.Regexp(t, `^[0-9a-f]{64}$`, env["LLORCH_LINK_TOKEN"])
	assert.Equal(t, first.LinkToken, env["LLORCH_LINK_TOKEN"])
	assert.NotEqual(t, first.Token, first.LinkToken, "the link token is a secret of its own")
	assert.Equal(t, "127.0.0.1:"+strconv.Itoa(cfg.TemporalPort), env["LLORCH_TEMPORAL_ADDRESS"])
	assert.Equal(t, "127.0.0.1:"+strconv.Itoa(cfg.S3Port), env["LLORCH_S3_ENDPOINT"])
	assert.Equal(t, first.AccessKey, env["LLORCH_S3_ACCESS_KEY"])
	assert.Equal(t, first.SecretKey, env["LLORCH_S3_SECRET_KEY"])
	assert.Equal(t, DefaultBucket, env["LLORCH_S3_BUCKET"])
	assert.Equal(t, "http://127.0.0.1:"+strconv.Itoa(cfg.APIPort), env["LLORCH_API_URL"])
	assert.Equal(t, first.CodecKeys, env["LLORCH_CODEC_KEYS"], "the dev cluster runs encrypted")
	c, err := codec.Parse(first.CodecKeys)
	require.NoError(t, err, "dev.env holds a codec key the commands accept")
	assert.Equal(t, "dev1", c.KeyID())

	other, err := Setup(portsConfig(t))
	require.NoError(t, err)
	assert.NotEqual(t, first.Token, other.Token, "a new state dir gets new secrets")
	assert.NotEqual(t, first.CodecKeys, other.CodecKeys)
}

func TestLockHomeRefusesSecondRun(t *testing.T) {
	home := t.TempDir()
	release, err := lockHome(home)
	require.NoError(t, err)
	_, err = lockHome(home)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "another `llorch dev`")
	assert.Contains(t, err.Error(), strconv.Itoa(os.Getpid()))
	release()
	release2, err := lockHome(home)
	require.NoError(t, err)
	release2()
}

func TestSanitizeNodeID(t *testing.T) {
	for in, want := range map[string]string{
		"dev-myhost":                     "dev-myhost",
		"dev-My_Host":                    "dev-my_host",
		"dev-host name!!x":               "dev-host-name-x",
		"dev-":                           "dev",
		"dev-" + strings.Repeat("a", 80): "dev-" + strings.Repeat("a", 59),
		"dev-ünïcode":                    "dev-n-code",
	} {
		got := SanitizeNodeID(in)
		assert.Equal(t, want, got, in)
		assert.NoError(t, node.ValidateID(got), in)
	}
	assert.NoError(t, node.ValidateID(DefaultNodeID()))
}

func TestResolveBinMissingSaysHowToInstall(t *testing.T) {
	t.Chdir(t.TempDir())
	t.Setenv("PATH", t.TempDir())
	_, err := ResolveBin("temporal", "", "--temporal-bin", temporalInstall)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "just dev")
	assert.Contains(t, err.Error(), "go install github.com/temporalio/cli/cmd/temporal@v1.5.1")

	_, err = ResolveBin("versitygw", "/nonexistent/versitygw", "--versitygw-bin", versitygwInstall)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--versitygw-bin")
	assert.Contains(t, err.Error(), "versitygw@v1.8.0")

	// ./bin comes before PATH.
	require.NoError(t, os.Mkdir("bin", 0o755))
	require.NoError(t, os.WriteFile("bin/temporal", []byte("#!/bin/sh\n"), 0o755))
	p, err := ResolveBin("temporal", "", "--temporal-bin", temporalInstall)
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(p))
	assert.Equal(t, "temporal", filepath.Base(p))
}

// fakeServers is a config that runs the scripts temporal and vgw as its
// servers and a llorch that fails at once.
func fakeServers(t *testing.T, temporal, vgw string) Config {
	cfg := portsConfig(t)
	cfg.TemporalBin, cfg.VersitygwBin, cfg.Exe = temporal, vgw, "/bin/false"
	cfg.StopGrace = 5 * time.Second
	return cfg
}

// TestRunChildCrashStopsEverything runs Run with fake servers: "temporal"
// dies at once, "versitygw" would run forever. Run must name the dead child
// and its status and output, and leave nothing running, grandchildren included.
func TestRunChildCrashStopsEverything(t *testing.T) {
	dir := t.TempDir()
	temporal := filepath.Join(dir, "temporal")
	// It leaves a grandchild behind (same args, so its command line names
	// the state dir too), as a worker could leave an engine: the sweep of
	// the child's process group must take it.
	require.NoError(t, os.WriteFile(temporal, []byte(`#!/bin/sh
if [ "$1" = grandchild ]; then while :; do sleep 0.2; done; fi
"$0" grandchild "$@" &
echo boom: no database
exit 3
`), 0o755))
	vgw := filepath.Join(dir, "versitygw")
	require.NoError(t, os.WriteFile(vgw, []byte("#!/bin/sh\nwhile :; do sleep 0.2; done\n"), 0o755))

	cfg := fakeServers(t, temporal, vgw)
	var out testenv.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := Run(ctx, cfg, &out)
	require.Error(t, err, out.String())
	assert.Contains(t, err.Error(), "temporal (pid")
	assert.Contains(t, err.Error(), "exit status 3")
	assert.Contains(t, err.Error(), "boom: no database")
	assert.Contains(t, out.String(), "[temporal]")
	assert.Contains(t, out.String(), "stopping s3")
	assert.Empty(t, testenv.Mentioning(cfg.Home), "no child may outlive Run")
}

// TestRunInterruptedDuringStartStopsEverything cancels while a child is
// still "starting" (a fake Temporal that never becomes ready).
func TestRunInterruptedDuringStartStopsEverything(t *testing.T) {
	dir := t.TempDir()
	slow := filepath.Join(dir, "slow")
	require.NoError(t, os.WriteFile(slow, []byte("#!/bin/sh\necho waiting\nwhile :; do sleep 0.2; done\n"), 0o755))
	cfg := fakeServers(t, slow, slow)
	var out testenv.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, &out) }()
	require.Eventually(t, func() bool { return strings.Count(out.String(), "waiting") == 2 }, time.Minute, 20*time.Millisecond, out.String())
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err, "a stop asked for is not an error; output:\n%s", out.String())
	case <-time.After(time.Minute):
		t.Fatalf("Run did not return after cancel; output:\n%s", out.String())
	}
	assert.Contains(t, out.String(), "all stopped")
	assert.Empty(t, testenv.Mentioning(cfg.Home))
}

func TestRunRejectsBadReplicaCount(t *testing.T) {
	for _, n := range []int{-1, MaxAPIServers + 1} {
		cfg := fakeServers(t, "/bin/false", "/bin/false")
		cfg.APIServers = n
		var out strings.Builder
		err := Run(context.Background(), cfg, &out)
		require.Error(t, err)
		assert.Contains(t, err.Error(), fmt.Sprintf("--apiservers %d: must be 1 to 16", n))
		assert.NotContains(t, out.String(), "starting")
	}
	assert.Error(t, ValidateAPIServers(0), "the CLI's 0 is not the default")
	assert.NoError(t, ValidateAPIServers(3))
}

func TestFreeLoopbackPortsAvoidsConfiguredOnes(t *testing.T) {
	cfg := portsConfig(t)
	addrs, err := freeLoopbackPorts(3, cfg.ports())
	require.NoError(t, err)
	require.Len(t, addrs, 3)
	seen := map[string]bool{}
	for _, a := range addrs {
		require.False(t, seen[a], "port given twice: %v", addrs)
		seen[a] = true
		for _, p := range cfg.ports() {
			require.NotEqual(t, hostPort(p.n), a)
		}
	}
}
