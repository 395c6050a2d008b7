package chaos

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// tmpfs mounts a small tmpfs at dir for the test.
func tmpfs(t *testing.T, dir string, size string) {
	requireRoot(t, "a small disk (tmpfs)")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	sh(t, "mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir)
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
}

// fill writes to dir until its disk is full.
func fill(t *testing.T, dir string) string {
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	chunk := make([]byte, 256<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			require.True(t, errors.Is(err, syscall.ENOSPC), "filling the disk: %v", err)
			return path
		}
	}
}

// Disk full during staging: another writer fills the node's model disk (a
// 16 MiB tmpfs) while a pool's model downloads. The staging fails for good
// with DISK_FULL naming the bytes, and so does the pool, with that reason;
// neither a partial nor a file is left in the node's catalog, and no engine
// starts. Once space is freed, the same pool id starts and is Ready.
func TestDiskFullDuringStaging(t *testing.T) {
	dir := t.TempDir()
	models := filepath.Join(dir, "models")
	tmpfs(t, models, "16m")
	trial := testenv.NewTrial(t, "disk full during staging (tmpfs)")
	t.Cleanup(func() { testenv.KillMentioning(dir) })
	t.Cleanup(func() { env.TerminateRunning(t, "Pool", "Task") })
	bin := testenv.Llorch(t)
	s3, err := testenv.NewProxy(env.S3.Endpoint)
	require.NoError(t, err)
	t.Cleanup(s3.Close)

	a := api{t: t, addr: "127.0.0.1:" + strconv.Itoa(port(t))}
	start(t, "apiserver", bin, append([]string{"apiserver", "--addr", a.addr,
		"--temporal-address", env.TemporalAddr, "--home", filepath.Join(dir, "api")}, s3Flags(env.S3.Endpoint)...)...)
	start(t, "worker", bin, append([]string{"worker", "--node-id", "full-1", "--temporal-address", env.TemporalAddr,
		"--home", filepath.Join(dir, "home"), "--model-dir", models, "--disk-margin", "1MiB",
		"--metrics-addr", "127.0.0.1:0", "--heartbeat-interval", "1s"}, s3Flags(s3.Addr)...)...)
	a.waitNode("full-1", "Online", 2*time.Minute)
	sha, size := pushModel(t, a, "full-model", modelstore.TinyOptions{Embd: 256, Layers: 4, Context: 2048, Seed: 9})
	require.Less(t, size, int64(15<<20), "the model fits the disk with its margin")

	// Slow the download so the disk fills in the middle of it.
	s3.SetRate(2 << 20)
	code, body := a.call("POST", "/v2/pools", `{"pool_id":"df1","model_id":"full-model","node_id":"full-1","ctx":2048,"slots":1}`)
	require.Equal(t, 202, code, body)
	testenv.Eventually(t, time.Minute, "download under way", func() (bool, string) {
		return s3.Down.Load() > size/4, fmt.Sprint(s3.Down.Load())
	})
	filler := fill(t, models)
	s3.SetRate(0)

	h := a.waitPool("df1", 2*time.Minute, func(h map[string]any) bool { return h["state"] == "Failed" })
	reason := fmt.Sprint(h["last_error"])
	require.Contains(t, reason, "DISK_FULL", h)
	require.Contains(t, reason, "bytes free", "the reason says how much room there is")
	_, m := a.call("GET", "/v2/nodes/full-1/models", "")
	require.Contains(t, fmt.Sprint(m), "DISK_FULL", "the node's model list says why too")
	ents, err := os.ReadDir(models)
	require.NoError(t, err)
	for _, e := range ents {
		require.False(t, strings.HasPrefix(e.Name(), sha), "nothing of the model enters the catalog: %s", e.Name())
	}
	partials, _ := os.ReadDir(filepath.Join(models, ".partial"))
	require.Empty(t, partials, "the partial is deleted, freeing what it held")
	require.Empty(t, testenv.EnginePIDs("df1"), "no engine starts without its model")

	// Free the space; the same pool id starts.
	require.NoError(t, os.Remove(filler))
	freed := time.Now()
	code, body = a.call("POST", "/v2/pools", `{"pool_id":"df1","model_id":"full-model","node_id":"full-1","ctx":2048,"slots":1}`)
	require.Equal(t, 202, code, body)
	a.waitPool("df1", 2*time.Minute, func(h map[string]any) bool { return h["state"] == "Ready" })
	t.Logf("disk full mid-download: pool Failed with %q; Ready %s after space was freed", reason, time.Since(freed).Round(time.Millisecond))
	trial.Recovered(time.Since(freed), "DISK_FULL reached the client, nothing half-written; pool Ready once space was freed")
}
