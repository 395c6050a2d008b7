// Package chaos is the failure suite: `just chaos`. Each scenario breaks a
// part of a running cluster and asserts that no task is lost, no process
// is orphaned and clients get clear errors. It runs only with
// LLORCH_CHAOS=1 (the scenarios overlap the e2e tests that CI runs).
package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/searchattrs"
	"github.com/llorch/llorch/testenv"
)

var env *testenv.Env

func TestMain(m *testing.M) {
	if os.Getenv("LLORCH_CHAOS") != "1" {
		fmt.Println("chaos: skipped (run `just chaos`, or set LLORCH_CHAOS=1)")
		os.Exit(0)
	}
	testenv.Main(m, &env)
}

const token = "chaos-token-0123456789abcdef0123456789abcdef"

// proc is a child process that can be killed and started again.
type proc struct {
	t    *testing.T
	bin  string
	args []string
	cmd  *exec.Cmd
	log  *os.File
}

func start(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	log, err := os.Create(filepath.Join(t.TempDir(), name+".log"))
	require.NoError(t, err)
	p := &proc{t: t, bin: bin, args: args, log: log}
	p.start()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) start() {
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	require.NoError(p.t, p.cmd.Start())
}

func (p *proc) kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
}

type api struct {
	t    *testing.T
	addr string
}

func (a api) call(method, path, body string) (int, map[string]any) {
	req, _ := http.NewRequest(method, "http://"+a.addr+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, map[string]any{"error": err.Error()}
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var m map[string]any
	_ = json.Unmarshal(raw, &m)
	if m == nil {
		m = map[string]any{"raw": string(raw)}
	}
	return res.StatusCode, m
}

func port(t *testing.T) int {
	p, err := testenv.FreePort()
	require.NoError(t, err)
	return p
}

// Restart of the Temporal server (file database) with tasks in flight:
// every task still completes, whole; no engine process is left behind.
func TestTemporalRestartWithTasksInFlight(t *testing.T) {
	temporalBin, err := testenv.Tool("temporal")
	require.NoError(t, err)
	dir := t.TempDir()
	tport := port(t)
	args := []string{"server", "start-dev", "--ip", "127.0.0.1", "--port", strconv.Itoa(tport), "--headless",
		"--db-filename", filepath.Join(dir, "temporal.db"),
		"--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off",
		"--log-level", "error", "--namespace", "default"}
	for _, k := range searchattrs.All {
		args = append(args, "--search-attribute", k.GetName()+"=Keyword")
	}
	temporal := start(t, "temporal", temporalBin, args...)
	taddr := "127.0.0.1:" + strconv.Itoa(tport)

	bin := testenv.Llorch(t)
	common := []string{"--temporal-address", taddr, "--home", filepath.Join(dir, "home"),
		"--s3-endpoint", env.S3.Endpoint, "--s3-access-key", env.S3.AccessKey, "--s3-secret-key", env.S3.SecretKey, "--s3-bucket", env.S3.Bucket}
	a := api{t: t, addr: "127.0.0.1:" + strconv.Itoa(port(t))}
	start(t, "apiserver", bin, append([]string{"apiserver", "--addr", a.addr}, common...)...)
	start(t, "worker", bin, append([]string{"worker", "--node-id", "chaos-1", "--metrics-addr", "127.0.0.1:0"}, common...)...)
	t.Cleanup(func() { testenv.KillMentioning(dir) })

	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	path := filepath.Join(t.TempDir(), "m.gguf")
	require.NoError(t, modelstore.WriteTinyFile(path, modelstore.TinyOptions{Embd: 512, Layers: 8, Context: 4096, Seed: 3}))
	f, err := os.Open(path)
	require.NoError(t, err)
	_, err = store.Upload(context.Background(), f, -1, model.DefaultKey("chaos-model"), nil)
	f.Close()
	require.NoError(t, err)
	testenv.Eventually(t, 2*time.Minute, "node online", func() (bool, string) {
		code, body := a.call("GET", "/v2/nodes/chaos-1", "")
		return code == 200 && body["state"] == "Online", fmt.Sprint(body)
	})
	code, body := a.call("POST", "/v2/catalog/models", `{"id":"chaos-model","key":"`+model.DefaultKey("chaos-model")+`","replace":true}`)
	require.Contains(t, []int{200, 201}, code, body)
	code, body = a.call("POST", "/v2/pools", `{"pool_id":"cp1","model_id":"chaos-model","node_id":"chaos-1","ctx":4096,"slots":2}`)
	require.Equal(t, 202, code, body)
	testenv.Eventually(t, 2*time.Minute, "pool ready", func() (bool, string) {
		_, h := a.call("GET", "/v2/pools/cp1/health", "")
		return h["state"] == "Ready", fmt.Sprint(h)
	})

	const tasks = 6
	for i := range tasks {
		code, body := a.call("POST", "/v2/tasks", fmt.Sprintf(`{"task_id":"c-%d","model_ref":"chaos-model","prompt":"the","max_tokens":600,"determinism":"strict"}`, i))
		require.Equal(t, 202, code, body)
	}
	testenv.Eventually(t, time.Minute, "tasks running", func() (bool, string) {
		_, s := a.call("GET", "/v2/tasks/c-0", "")
		return s["state"] == "Running", fmt.Sprint(s)
	})
	// Kill the server outright, keep it down a moment, start it again on
	// the same database and port.
	killedAt := time.Now()
	temporal.kill()
	time.Sleep(3 * time.Second) // the outage itself, not a wait for a condition
	temporal.start()

	for i := range tasks {
		var s map[string]any
		testenv.Eventually(t, 5*time.Minute, fmt.Sprintf("task c-%d completed", i), func() (bool, string) {
			_, s = a.call("GET", fmt.Sprintf("/v2/tasks/c-%d", i), "")
			return s["state"] == "Completed" || s["state"] == "Failed", fmt.Sprint(s)
		})
		require.Equal(t, "Completed", s["state"], "task c-%d: %v", i, s)
		require.EqualValues(t, 600, s["tokens_out"])
	}
	t.Logf("temporal restart: %d of %d tasks completed whole, %s after the kill", tasks, tasks, time.Since(killedAt).Round(time.Millisecond))
}
