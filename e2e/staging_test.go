package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/stretchr/testify/require"
	historypb "go.temporal.io/api/history/v1"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

// tinyModel writes a generated GGUF model and returns its path, digest and size.
func tinyModel(t *testing.T, o modelstore.TinyOptions) (string, string, int64) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "model.gguf")
	require.NoError(t, modelstore.WriteTinyFile(path, o))
	return hashFile(t, path)
}

// push uploads a model file and registers it through the API.
func (c *cluster) push(id, path string) map[string]any {
	c.t.Helper()
	store, err := modelstore.New(env.S3)
	require.NoError(c.t, err)
	f, err := os.Open(path)
	require.NoError(c.t, err)
	defer f.Close()
	_, err = store.Upload(context.Background(), f, -1, model.DefaultKey(id), nil)
	require.NoError(c.t, err)
	status, body := c.send("POST", "/v2/catalog/models", `{"id":"`+id+`","key":"`+model.DefaultKey(id)+`"}`)
	require.Contains(c.t, []int{200, 201}, status, body)
	return body
}

func (c *cluster) send(method, path, body string) (int, map[string]any) {
	req, _ := http.NewRequest(method, "http://"+c.api+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	defer res.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(res.Body)
	_ = json.Unmarshal(raw, &out)
	if out == nil {
		out = map[string]any{"raw": string(raw)}
	}
	return res.StatusCode, out
}

// nodeModel returns the node's view of one model ("" state when absent).
func (c *cluster) nodeModel(nodeID, sha string) map[string]any {
	_, body := c.get("/v2/nodes/" + nodeID + "/models")
	models, _ := body["models"].([]any)
	for _, m := range models {
		mm := m.(map[string]any)
		if mm["sha256"] == sha {
			return mm
		}
	}
	return map[string]any{"state": ""}
}

func (c *cluster) waitModel(nodeID, sha, state string, timeout time.Duration) map[string]any {
	c.t.Helper()
	var last map[string]any
	testenv.Eventually(c.t, timeout, "model "+sha[:12]+" "+state+" on "+nodeID, func() (bool, string) {
		last = c.nodeModel(nodeID, sha)
		return last["state"] == state, fmt.Sprint(last)
	})
	return last
}

// Five concurrent requests stage a model once; a worker killed mid-download
// resumes after restart, moving under 1.2x the object's bytes in all.
func TestStagingJoinsAndResumes(t *testing.T) {
	c := newCluster(t)
	proxy, err := testenv.NewProxy(env.S3.Endpoint)
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	id := "e2e-stage"
	w := c.onlineWorker(id, "--s3-endpoint", proxy.Addr)

	path, sha, size := tinyModel(t, modelstore.TinyOptions{Layers: 2, Embd: 512, Vocab: 600, Seed: 7})
	entry := c.push("big-tiny", path)
	require.Equal(t, sha, entry["sha256"])
	t.Logf("model: %d bytes", size)
	// Slow the node's link to S3 so the download lasts long enough to kill.
	proxy.SetRate(size / 20) // about 20 s: every request below lands while it runs

	var wg sync.WaitGroup
	runs := make(chan string, 5)
	for i := 0; i < 5; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body := c.send("POST", "/v2/nodes/"+id+"/models/big-tiny", "")
			require.Equal(t, 202, status, body)
			runs <- fmt.Sprint(body["workflow_id"], "/", body["run_id"])
		}()
	}
	wg.Wait()
	close(runs)
	first := <-runs
	for r := range runs {
		require.Equal(t, first, r, "concurrent requests join one staging")
	}
	require.True(t, strings.HasPrefix(first, model.StageWorkflowID(id, sha)+"/"))

	// Kill the worker once part of the object has crossed the link.
	testenv.Eventually(t, 30*time.Second, "download under way", func() (bool, string) {
		return proxy.Down.Load() > size/3, fmt.Sprint(proxy.Down.Load())
	})
	m := c.nodeModel(id, sha)
	require.Equal(t, "staging", m["state"], m)
	trial := testenv.NewTrial(t, "kill -9 of a worker mid-download")
	killed := time.Now()
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	proxy.SetRate(0)
	w = c.worker(id, "--s3-endpoint", proxy.Addr)
	m = c.waitModel(id, sha, "ready", 90*time.Second)
	moved := proxy.Down.Load()
	t.Logf("object %d bytes; moved over the link %d bytes (%.2fx) with one kill -9 mid-download", size, moved, float64(moved)/float64(size))
	require.Less(t, float64(moved), 1.2*float64(size))
	trial.Recovered(time.Since(killed), fmt.Sprintf("model ready and verified; %.2fx the bytes moved", float64(moved)/float64(size)))

	// The file on the node is the verified model.
	local := filepath.Join(c.home, "nodes", id, "models", sha+".gguf")
	_, gotSHA, gotSize := hashFile(t, local)
	require.Equal(t, sha, gotSHA)
	require.Equal(t, size, gotSize)
	// The restarted worker failed the dead one's attempt at once instead of
	// waiting out its heartbeat timeout.
	// (A retried attempt leaves no event; the started event of the last
	// one carries the failure of the attempt before.)
	var last *historypb.ActivityTaskStartedEventAttributes
	for _, e := range history(t, model.StageWorkflowID(id, sha), "").GetEvents() {
		if a := e.GetActivityTaskStartedEventAttributes(); a != nil {
			last = a
		}
	}
	require.NotNil(t, last)
	require.EqualValues(t, 2, last.GetAttempt(), "one retry")
	require.Equal(t, model.ErrAttemptAbandoned, last.GetLastFailure().GetApplicationFailureInfo().GetType(),
		"the killed worker's attempt was failed as abandoned, not timed out: %v", last.GetLastFailure())
	recordHistory(t, model.StageWorkflowID(id, sha), "stage-killed-resumed")

	// Availability says where it is.
	_, av := c.get("/v2/catalog/availability")
	require.Contains(t, fmt.Sprint(av["models"]), id)
	c.leave(w, id)
}

func hashFile(t *testing.T, path string) (string, string, int64) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	require.NoError(t, err)
	return path, hex.EncodeToString(h.Sum(nil)), n
}

// An object altered after registration fails its staging cleanly with
// CHECKSUM_MISMATCH; a node without room fails the preflight with DISK_FULL.
// Neither leaves a file in the node's catalog.
func TestStagingFailuresAreClean(t *testing.T) {
	c := newCluster(t)
	id, full := "e2e-check", "e2e-full"
	w := c.worker(id)
	wf := c.worker(full, "--disk-margin", "1000TB")
	c.waitState(id, node.Online, 60*time.Second)
	c.waitState(full, node.Online, 60*time.Second)
	// Each node has its GC schedule while it is a member.
	desc, err := env.Temporal.ScheduleClient().GetHandle(context.Background(), model.GCWorkflowID(id)).Describe(context.Background())
	require.NoError(t, err)
	require.Equal(t, 15*time.Minute, desc.Schedule.Spec.Intervals[0].Every)

	path, sha, _ := tinyModel(t, modelstore.TinyOptions{Seed: 11})
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	c.push("altered", path)
	other, _, _ := tinyModel(t, modelstore.TinyOptions{Seed: 12})
	f, err := os.Open(other)
	require.NoError(t, err)
	_, err = store.Upload(context.Background(), f, -1, model.DefaultKey("altered"), nil)
	f.Close()
	require.NoError(t, err)

	trial := testenv.NewTrial(t, "object corrupted after registration")
	status, body := c.send("POST", "/v2/nodes/"+id+"/models/altered", "")
	require.Equal(t, 202, status, body)
	asked := time.Now()
	m := c.waitModel(id, sha, "failed", 60*time.Second)
	trial.Recovered(time.Since(asked), "CHECKSUM_MISMATCH reached the client, nothing staged")
	require.Equal(t, model.ErrChecksumMismatch, m["code"], m)
	require.Contains(t, m["reason"], sha, "the reason names the expected digest")
	entries, err := os.ReadDir(filepath.Join(c.home, "nodes", id, "models"))
	require.NoError(t, err)
	for _, e := range entries {
		require.False(t, strings.HasPrefix(e.Name(), sha), "a corrupt file never enters the catalog: %s", e.Name())
	}
	partials, _ := os.ReadDir(filepath.Join(c.home, "nodes", id, "models", ".partial"))
	require.Empty(t, partials)
	recordHistory(t, model.StageWorkflowID(id, sha), "stage-checksum-mismatch")

	// verify finds the altered object too.
	status, body = c.send("POST", "/v2/catalog/models/altered/verify", "")
	require.Equal(t, 409, status, body)
	require.Equal(t, model.ErrChecksumMismatch, body["code"])

	path2, sha2, _ := tinyModel(t, modelstore.TinyOptions{Seed: 13})
	c.push("roomy", path2)
	status, body = c.send("POST", "/v2/nodes/"+full+"/models/roomy", "")
	require.Equal(t, 202, status, body)
	m = c.waitModel(full, sha2, "failed", 60*time.Second)
	require.Equal(t, model.ErrDiskFull, m["code"], m)
	require.Contains(t, m["reason"], "free")

	w.signal(t, syscall.SIGTERM)
	wf.signal(t, syscall.SIGTERM)
	c.waitState(id, node.Left, 20*time.Second)
	c.waitState(full, node.Left, 20*time.Second)
	require.Equal(t, 0, w.wait(t, 30*time.Second))
	_, err = env.Temporal.ScheduleClient().GetHandle(context.Background(), model.GCWorkflowID(id)).Describe(context.Background())
	require.Error(t, err, "a node that left has no GC schedule")
}

// GC honours the watermarks (LRU down to the low one), evicts Retired
// models, records every deletion, and its dry run deletes nothing.
func TestGC(t *testing.T) {
	c := newCluster(t)
	id := "e2e-gc"
	// Three models of 568,832 bytes; a 1.6 MB budget: three are above the
	// high watermark (0.9 x 1.6 MB), two are below the low one (0.75 x 1.6 MB).
	w := c.onlineWorker(id, "--gc-budget", "1.6MB", "--gc-high-watermark", "0.9", "--gc-low-watermark", "0.75", "--gc-interval", "0")
	var shas []string
	for i, name := range []string{"gc-a", "gc-b", "gc-c"} {
		path, sha, size := tinyModel(t, modelstore.TinyOptions{Seed: int64(100 + i)})
		require.Less(t, size, int64(600_000))
		c.push(name, path)
		status, body := c.send("POST", "/v2/nodes/"+id+"/models/"+name, "")
		require.Equal(t, 202, status, body)
		c.waitModel(id, sha, "ready", 60*time.Second)
		shas = append(shas, sha)
	}

	status, plan := c.send("POST", "/v2/nodes/"+id+"/gc?dry_run=true", "")
	require.Equal(t, 200, status, plan)
	evicted := plan["evicted"].([]any)
	require.Len(t, evicted, 1, plan)
	first := evicted[0].(map[string]any)
	require.Equal(t, "gc-a", first["model_id"], "the least recently used goes first")
	require.Equal(t, "lru", first["reason"])
	require.Equal(t, "ready", c.nodeModel(id, shas[0])["state"], "a dry run deletes nothing")

	status, res := c.send("POST", "/v2/nodes/"+id+"/gc", "")
	require.Equal(t, 200, status, res)
	require.Len(t, res["evicted"].([]any), 1)
	_, err := os.Stat(filepath.Join(c.home, "nodes", id, "models", shas[0]+".gguf"))
	require.True(t, os.IsNotExist(err), "gc-a's file is gone")
	testenv.Eventually(t, 10*time.Second, "gc-a no longer reported", func() (bool, string) {
		m := c.nodeModel(id, shas[0])
		return m["state"] != "ready", fmt.Sprint(m)
	})
	recordHistory(t, model.GCWorkflowID(id), "gc-lru-eviction")

	// Retire gc-c: it goes even though usage is under the watermarks now.
	status, body := c.send("POST", "/v2/catalog/models/gc-c/state", `{"state":"Retired"}`)
	require.Equal(t, 200, status, body)
	status, res = c.send("POST", "/v2/nodes/"+id+"/gc", "")
	require.Equal(t, 200, status, res)
	ev := res["evicted"].([]any)
	require.Len(t, ev, 1, res)
	require.Equal(t, "retired", ev[0].(map[string]any)["reason"])
	require.Equal(t, "ready", c.nodeModel(id, shas[1])["state"], "gc-b is kept: under the watermark and Active")
	status, body = c.send("POST", "/v2/nodes/"+id+"/models/gc-c", "")
	require.Equal(t, 409, status, body)
	require.Equal(t, "MODEL_RETIRED", body["code"])

	c.leave(w, id)
}

// The models CLI against a running cluster: gen-tiny, push (then the same
// again: a no-op; other content: refused without --replace), ls, rm.
func TestModelsCLI(t *testing.T) {
	c := newCluster(t)
	bin := testenv.Llorch(t)
	dir := t.TempDir()
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append(args, "--home", c.home)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
			"LLORCH_API_URL=http://" + c.api, "LLORCH_API_TOKEN=" + token,
			"LLORCH_S3_ENDPOINT=" + env.S3.Endpoint, "LLORCH_S3_ACCESS_KEY=" + env.S3.AccessKey,
			"LLORCH_S3_SECRET_KEY=" + env.S3.SecretKey, "LLORCH_S3_BUCKET=" + env.S3.Bucket}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	runNoHome := func(args ...string) (string, error) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	a, b := filepath.Join(dir, "a.gguf"), filepath.Join(dir, "b.gguf")
	out, err := runNoHome("models", "gen-tiny", "--out", a, "--seed", "5")
	require.NoError(t, err, out)
	_, shaA, _ := hashFile(t, a)
	require.Contains(t, out, shaA)
	out, err = runNoHome("models", "gen-tiny", "--out", b, "--seed", "6")
	require.NoError(t, err, out)

	out, err = run("models", "push", a, "--id", "cli-tiny")
	require.NoError(t, err, out)
	require.Contains(t, out, shaA)
	out, err = run("models", "push", a, "--id", "cli-tiny")
	require.NoError(t, err, out)
	require.Contains(t, out, "nothing to do")
	out, err = run("models", "push", b, "--id", "cli-tiny")
	require.Error(t, err, out)
	require.Contains(t, out, "--replace")
	out, err = run("models", "push", b, "--id", "cli-tiny", "--replace")
	require.NoError(t, err, out)
	_, shaB, _ := hashFile(t, b)
	_, entry := c.get("/v2/catalog/models/cli-tiny")
	require.Equal(t, shaB, entry["sha256"])
	require.Equal(t, "llama", entry["metadata"].(map[string]any)["architecture"])
	// The replacement went through a scratch key, copied into place once
	// accepted; nothing is left there.
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	for obj := range store.Client.ListObjects(context.Background(), store.Bucket, minio.ListObjectsOptions{Prefix: "uploads/", Recursive: true}) {
		require.NoError(t, obj.Err)
		t.Errorf("left behind: %s", obj.Key)
	}

	out, err = run("models", "ls")
	require.NoError(t, err, out)
	require.Contains(t, out, "cli-tiny")
	out, err = run("models", "rm", "cli-tiny")
	require.NoError(t, err, out)
	status, _ := c.get("/v2/catalog/models/cli-tiny")
	require.Equal(t, 404, status)

	// Not a model: refused, and nothing registered.
	junk := filepath.Join(dir, "junk.gguf")
	require.NoError(t, os.WriteFile(junk, []byte("PK\x03\x04 this is a zip"), 0o644))
	out, err = run("models", "push", junk, "--id", "junk")
	require.Error(t, err, out)
	status, _ = c.get("/v2/catalog/models/junk")
	require.Equal(t, 404, status)
}
