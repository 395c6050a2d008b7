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
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

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
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	require.NoError(t, err)
	return path, hex.EncodeToString(h.Sum(nil)), n
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
	w := c.worker(id, "--s3-endpoint", proxy.Addr)
	c.waitState(id, node.Online, 60*time.Second)

	path, sha, size := tinyModel(t, modelstore.TinyOptions{Layers: 2, Embd: 512, Vocab: 600, Seed: 7})
	entry := c.push("big-tiny", path)
	require.Equal(t, sha, entry["sha256"])
	t.Logf("model: %d bytes", size)
	// Slow the node's link to S3 so the download lasts long enough to kill.
	proxy.SetRate(size / 4)

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
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	proxy.SetRate(0)
	w = c.worker(id, "--s3-endpoint", proxy.Addr)
	m = c.waitModel(id, sha, "ready", 90*time.Second)
	moved := proxy.Down.Load()
	t.Logf("object %d bytes; moved over the link %d bytes (%.2fx) with one kill -9 mid-download", size, moved, float64(moved)/float64(size))
	require.Less(t, float64(moved), 1.2*float64(size))

	// The file on the node is the verified model.
	local := filepath.Join(c.home, "nodes", id, "models", sha+".gguf")
	_, gotSHA, gotSize := hashFile(t, local)
	require.Equal(t, sha, gotSHA)
	require.Equal(t, size, gotSize)
	recordHistory(t, model.StageWorkflowID(id, sha), "stage-killed-resumed")

	// Availability says where it is.
	_, av := c.get("/v2/catalog/availability")
	require.Contains(t, fmt.Sprint(av["models"]), id)
	w.signal(t, syscall.SIGTERM)
	c.waitState(id, node.Left, 20*time.Second)
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
