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
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

var env *testenv.Env

func TestMain(m *testing.M) {
	if os.Getenv("LLORCH_CHAOS") != "1" {
		fmt.Println("chaos: skipped (run `just chaos`, or set LLORCH_CHAOS=1)")
		os.Exit(0)
	}
	// Trials go to the report `just chaos` names (with the e2e scenarios
	// it ran before), else to one of this run's own.
	report := os.Getenv(testenv.ReportEnv)
	if report == "" {
		f, err := os.CreateTemp("", "llorch-chaos-*.jsonl")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		f.Close()
		report = f.Name()
		defer os.Remove(report)
		os.Setenv(testenv.ReportEnv, report)
	}
	code := testenv.Run(m, &env)
	table, ok, err := testenv.Summary(report)
	switch {
	case err != nil:
		fmt.Println("chaos summary:", err)
	default:
		fmt.Printf("\nchaos summary (%s):\n%s", report, table)
	}
	if code == 0 && !ok {
		fmt.Println("chaos: a recorded trial failed")
		code = 1
	}
	os.Exit(code)
}

const token = "chaos-token-0123456789abcdef0123456789abcdef"

// linkToken is the cluster's node link secret (a node in its own network
// namespace serves its link on a non-loopback address, which needs one).
const linkToken = "chaos-link-0123456789abcdef0123456789abcdef"

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
	// Secrets in the environment: never on a command line.
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token,
		"LLORCH_LINK_TOKEN=" + linkToken, "LLORCH_S3_ACCESS_KEY=" + env.S3.AccessKey, "LLORCH_S3_SECRET_KEY=" + env.S3.SecretKey}
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

// pushModel uploads a generated model and registers it as id.
func pushModel(t *testing.T, a api, id string, opts modelstore.TinyOptions) (sha string, size int64) {
	t.Helper()
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	path := filepath.Join(t.TempDir(), id+".gguf")
	require.NoError(t, modelstore.WriteTinyFile(path, opts))
	f, err := os.Open(path)
	require.NoError(t, err)
	_, err = store.Upload(context.Background(), f, -1, model.DefaultKey(id), nil)
	f.Close()
	require.NoError(t, err)
	code, body := a.call("POST", "/v2/catalog/models", `{"id":"`+id+`","key":"`+model.DefaultKey(id)+`","replace":true}`)
	require.Contains(t, []int{200, 201}, code, body)
	return body["sha256"].(string), int64(body["size"].(float64))
}

func (a api) waitNode(id, state string, timeout time.Duration) time.Duration {
	a.t.Helper()
	began := time.Now()
	testenv.Eventually(a.t, timeout, "node "+id+" "+state, func() (bool, string) {
		_, body := a.call("GET", "/v2/nodes/"+id, "")
		return body["state"] == state, fmt.Sprint(body)
	})
	return time.Since(began)
}

// pool creates a pool and waits until it is Ready.
func (a api) pool(poolID, modelID, nodeID string, slots int) map[string]any {
	a.t.Helper()
	code, body := a.call("POST", "/v2/pools", fmt.Sprintf(`{"pool_id":%q,"model_id":%q,"node_id":%q,"ctx":4096,"slots":%d}`, poolID, modelID, nodeID, slots))
	require.Equal(a.t, 202, code, body)
	return a.waitPool(poolID, time.Minute*2, func(h map[string]any) bool { return h["state"] == "Ready" })
}

func (a api) waitPool(poolID string, timeout time.Duration, cond func(map[string]any) bool) map[string]any {
	a.t.Helper()
	var h map[string]any
	testenv.Eventually(a.t, timeout, "pool "+poolID, func() (bool, string) {
		_, h = a.call("GET", "/v2/pools/"+poolID+"/health", "")
		return cond(h), fmt.Sprint(h)
	})
	return h
}

// s3Flags point a process at the test bucket through endpoint (its keys
// are in every process's environment: see proc.start).
func s3Flags(endpoint string) []string {
	return []string{"--s3-endpoint", endpoint, "--s3-bucket", env.S3.Bucket}
}
