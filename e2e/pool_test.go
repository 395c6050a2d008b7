package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/cpuset"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
)

func (c *cluster) poolHealth(id string) map[string]any {
	_, h := c.get("/v2/pools/" + id + "/health")
	return h
}

func (c *cluster) waitPool(id string, want pool.State, timeout time.Duration) map[string]any {
	c.t.Helper()
	var h map[string]any
	testenv.Eventually(c.t, timeout, "pool "+id+" "+string(want), func() (bool, string) {
		h = c.poolHealth(id)
		return h["state"] == string(want), fmt.Sprint(h)
	})
	return h
}

// readyPool pushes a generated model, creates a pool of it on nodeID (extra
// JSON fields in extra, e.g. `,"slots":2`) and waits for it to be Ready.
func (c *cluster) readyPool(nodeID, poolID, modelID string, seed int64, extra string) map[string]any {
	c.t.Helper()
	path, _, _ := tinyModel(c.t, modelstore.TinyOptions{Seed: seed})
	c.push(modelID, path)
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"`+poolID+`","model_id":"`+modelID+`","node_id":"`+nodeID+`"`+extra+`}`)
	require.Equal(c.t, 202, status, body)
	return c.waitPool(poolID, pool.Ready, 90*time.Second)
}

// A pool on a worker node: the model is staged on the way, the built-in
// engine starts and serves; a killed engine is restarted; a drain stops it
// and leaves no process and no handoff file.
func TestPoolLifecycle(t *testing.T) {
	c := newCluster(t)
	id := "e2e-pool"
	port, err := testenv.FreePort()
	require.NoError(t, err)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	// With two CPUs or more, the last is the engines' (--engine-cpus).
	have, err := cpuset.Of(0)
	require.NoError(t, err)
	last := cpuset.Last(have)
	args := []string{"--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port)}
	if have.Count() >= 2 {
		args = append(args, "--engine-cpus", strconv.Itoa(last))
	}
	w := c.onlineWorker(id, args...)
	h := c.readyPool(id, "p1", "pool-tiny", 21, `,"slots":2`)
	// The worker holds the API token in its environment; its engine does
	// not inherit it (nor any other secret: the engine's env is allowlisted).
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", int(h["pid"].(float64))))
	require.NoError(t, err)
	require.NotContains(t, string(environ), "LLORCH_API_TOKEN=", "the engine inherits no secret of its worker")
	require.Contains(t, string(environ), "LLORCH_POOL_ID=p1")
	if have.Count() >= 2 {
		engineCPUs, err := cpuset.Of(int(h["pid"].(float64)))
		require.NoError(t, err)
		require.Equal(t, strconv.Itoa(last), cpuset.Format(engineCPUs), "the engine runs on --engine-cpus")
		workerCPUs, err := cpuset.Of(w.cmd.Process.Pid)
		require.NoError(t, err)
		require.False(t, workerCPUs.IsSet(last), "the worker keeps off the engines' CPUs: %s", cpuset.Format(workerCPUs))
	}
	seenReady := time.Now().UTC()
	// Handoff latency: engine's first /health 200 to Ready seen through the
	// API (polled every 25 ms, so this over-counts by up to one poll).
	raw, err := os.ReadFile(pool.HandoffPath(c.home+"/nodes/"+id+"/runtime", "p1"))
	require.NoError(t, err)
	var hf pool.Handoff
	require.NoError(t, json.Unmarshal(raw, &hf))
	latency := seenReady.Sub(hf.HealthyAt)
	t.Logf("handoff latency (first /health 200 -> Ready through the API): %s", latency)
	require.Less(t, latency, 2*time.Second, "aim is 500 ms; the bound is loose for loaded CI machines")
	require.Equal(t, true, h["ready"])
	require.EqualValues(t, 2, h["slots_total"])
	url := h["url"].(string)
	var res *http.Response
	res, err = http.Post(url+"/completion", "application/json", strings.NewReader(`{"prompt":"the","n_predict":8,"temperature":0}`))
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	handoff := pool.HandoffPath(c.home+"/nodes/"+id+"/runtime", "p1")
	require.FileExists(t, handoff)

	metrics := func() string {
		res, err := http.Get(metricsURL)
		require.NoError(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return string(b)
	}
	require.Contains(t, metrics(), `llorch_pool_ready{node_id="e2e-pool",pool_id="p1"} 1`)
	// Memory per pool: the engine's resident memory, from the supervisor's beats.
	rss := regexp.MustCompile(`llorch_pool_memory_bytes\{kind="ram",node_id="e2e-pool",pool_id="p1"\} ([0-9.e+]+)`)
	testenv.Eventually(t, 10*time.Second, "engine memory exported", func() (bool, string) {
		m := rss.FindStringSubmatch(metrics())
		if m == nil {
			return false, "no sample"
		}
		v, err := strconv.ParseFloat(m[1], 64)
		return err == nil && v > 1<<20, m[0]
	})

	// Kill the engine: the pool goes Unready, then Ready again on a new epoch.
	trial := testenv.NewTrial(t, "kill -9 of an engine")
	pid := int(h["pid"].(float64))
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	killed := time.Now()
	testenv.Eventually(t, 60*time.Second, "engine restarted", func() (bool, string) {
		h = c.poolHealth("p1")
		return h["state"] == string(pool.Ready) && h["epoch"].(float64) >= 2, fmt.Sprint(h)
	})
	trial.Recovered(time.Since(killed), "pool Ready on a new epoch")
	if have.Count() >= 2 {
		engineCPUs, err := cpuset.Of(int(h["pid"].(float64)))
		require.NoError(t, err)
		require.Equal(t, strconv.Itoa(last), cpuset.Format(engineCPUs), "the restarted engine runs on --engine-cpus too")
	}
	require.EqualValues(t, 1, h["restarts"])
	require.Contains(t, h["last_error"], "exited")
	testenv.Eventually(t, 10*time.Second, "engine exit counted", func() (bool, string) {
		m := metrics()
		return strings.Contains(m, `llorch_engine_exits_total{node_id="e2e-pool",pool_id="p1",reason="exited"} 1`), m
	})

	// Drain: Stopped, engine gone, handoff removed.
	newPID := int(h["pid"].(float64))
	status, body := c.send("POST", "/v2/pools/p1/drain", `{"deadline_ms":5000}`)
	require.Equal(t, 200, status, body)
	require.Equal(t, string(pool.Stopped), body["state"])
	testenv.Eventually(t, 10*time.Second, "engine process gone", func() (bool, string) {
		return syscall.Kill(newPID, 0) != nil, fmt.Sprint(newPID)
	})
	_, err = os.Stat(handoff)
	require.True(t, os.IsNotExist(err), "handoff removed")
	// The Temporal UI names who drained it (docs/security.md#audit).
	d, err := env.Temporal.DescribeWorkflowExecution(context.Background(), pool.WorkflowID(id, "p1"), "")
	require.NoError(t, err)
	var actor apikey.Actor
	var change string
	memo := d.GetWorkflowExecutionInfo().GetMemo().GetFields()
	require.NoError(t, env.DataConverter().FromPayload(memo[apikey.MemoActor], &actor))
	require.NoError(t, env.DataConverter().FromPayload(memo[apikey.MemoLastChange], &change))
	require.Equal(t, apikey.Actor{KeyID: apikey.BootstrapID, KeyName: "bootstrap", Addr: "127.0.0.1"}, actor)
	require.Equal(t, "drain", change)
	recordHistory(t, pool.WorkflowID(id, "p1"), "pool-state-ready-restarted-drained")

	status, body = c.send("POST", "/v2/pools", `{"pool_id":"p1","model_id":"nope","node_id":"`+id+`"}`)
	require.Equal(t, 404, status, body)
	status, body = c.send("GET", "/v2/pools/ghost/health", "")
	require.Equal(t, 404, status, body)
	require.Equal(t, "POOL_NOT_FOUND", body["code"])
	c.leave(w, id)
}

// Drain with a generation in flight: the drain waits for it (up to its
// deadline), the client gets its whole answer, then the engine stops.
func TestPoolDrainWaitsForInFlight(t *testing.T) {
	c := newCluster(t)
	id := "e2e-drain"
	w := c.onlineWorker(id)
	h := c.readyPool(id, "d1", "drain-tiny", 31, `,"ctx":8192`)
	url := h["url"].(string)

	type answer struct {
		status int
		tokens float64
		err    error
	}
	done := make(chan answer, 1)
	go func() {
		res, err := http.Post(url+"/completion", "application/json",
			strings.NewReader(`{"prompt":"the","n_predict":3000,"temperature":0}`))
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer res.Body.Close()
		var out struct {
			TokensPredicted float64 `json:"tokens_predicted"`
		}
		err = json.NewDecoder(res.Body).Decode(&out)
		done <- answer{status: res.StatusCode, tokens: out.TokensPredicted, err: err}
	}()
	testenv.Eventually(t, 30*time.Second, "generation in flight", func() (bool, string) {
		res, err := http.Get(url + "/slots")
		if err != nil {
			return false, err.Error()
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return strings.Contains(string(b), `"is_processing":true`), string(b)
	})
	status, body := c.send("POST", "/v2/pools/d1/drain", `{"deadline_ms":60000}`)
	require.Equal(t, 200, status, body)
	require.Equal(t, string(pool.Stopped), body["state"])
	select {
	case a := <-done:
		require.NoError(t, a.err)
		require.Equal(t, 200, a.status)
		require.EqualValues(t, 3000, a.tokens, "the in-flight generation finished before the engine stopped")
	case <-time.After(30 * time.Second):
		t.Fatal("the in-flight generation never answered")
	}
	recordHistory(t, pool.WorkflowID(id, "d1"), "pool-drain-waits-for-in-flight")
	c.leave(w, id)
}

// Kill the worker, not the engine. The built-in engine keeps serving; the
// restarted worker finds it and its pool adopts it (same pid, same epoch, no
// restart). Killed again and back only after the pool gave the node up
// (NODE_OFFLINE), the worker finds one engine for the pool in the end:
// adopted, or fenced and replaced. Killed a third time and not restarted,
// the engine exits once its supervisor lease lapses: no orphan.
func TestPoolEngineAdoptedFencedOrphaned(t *testing.T) {
	c := newCluster(t)
	id := "e2e-wkill"
	orphan := []string{"--engine-orphan-timeout", "10s"}
	w := c.onlineWorker(id, orphan...)
	h := c.readyPool(id, "k1", "wkill-tiny", 41, "")
	enginePID := int(h["pid"].(float64))
	url := h["url"].(string)

	// 1. Adopted.
	trial := testenv.NewTrial(t, "kill -9 of a worker, engine alive")
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	require.True(t, testenv.Alive(enginePID), "the engine outlives its worker")
	killedAt := time.Now()
	w = c.worker(id, orphan...)
	testenv.Eventually(t, 60*time.Second, "pool adopts the running engine", func() (bool, string) {
		h = c.poolHealth("k1")
		return h["state"] == string(pool.Ready) && int(h["pid"].(float64)) == enginePID && strings.Contains(w.out.String(), "engine adopted"), fmt.Sprint(h)
	})
	t.Logf("worker killed -> engine adopted by the restarted worker: %s", time.Since(killedAt))
	trial.Recovered(time.Since(killedAt), "engine adopted by the restarted worker (restart included)")
	require.EqualValues(t, 1, h["epoch"])
	require.EqualValues(t, 0, h["restarts"], "adopted, not restarted")
	res, err := http.Post(url+"/completion", "application/json", strings.NewReader(`{"prompt":"the","n_predict":4}`))
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	// The new worker supervises it: a killed engine is restarted.
	require.NoError(t, syscall.Kill(enginePID, syscall.SIGKILL))
	testenv.Eventually(t, 60*time.Second, "adopted engine's exit seen, engine restarted", func() (bool, string) {
		h = c.poolHealth("k1")
		return h["state"] == string(pool.Ready) && h["epoch"].(float64) == 2, fmt.Sprint(h)
	})
	enginePID = int(h["pid"].(float64))

	// 1b. Worker and engine both killed; the restarted worker tells the
	// pool at once (no wait for the supervisor's 15 s heartbeat timeout).
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	require.NoError(t, syscall.Kill(enginePID, syscall.SIGKILL))
	gone := time.Now()
	w = c.worker(id, orphan...)
	testenv.Eventually(t, 60*time.Second, "pool restarted its dead engine", func() (bool, string) {
		h = c.poolHealth("k1")
		return h["state"] == string(pool.Ready) && h["epoch"].(float64) == 3, fmt.Sprint(h)
	})
	t.Logf("engine died with its worker down: Ready again %s after the worker restart", time.Since(gone).Round(time.Millisecond))
	require.Less(t, time.Since(gone), 12*time.Second, "faster than the supervisor's 15 s heartbeat timeout")
	enginePID = int(h["pid"].(float64))

	// 2. Back after the pool gave the node up: adopted or fenced, one engine.
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	h = c.waitPool("k1", pool.Unready, 60*time.Second)
	require.Contains(t, h["last_error"], "NODE_OFFLINE")
	w = c.worker(id, orphan...)
	testenv.Eventually(t, 90*time.Second, "pool Ready again", func() (bool, string) {
		h = c.poolHealth("k1")
		return h["state"] == string(pool.Ready), fmt.Sprint(h)
	})
	pids := testenv.EnginePIDs("k1")
	require.Equal(t, []int{int(h["pid"].(float64))}, pids, "exactly the pool's engine runs")
	if h["epoch"].(float64) != 3 {
		require.False(t, testenv.Alive(enginePID), "the engine of epoch 3 was fenced")
	}
	t.Logf("after NODE_OFFLINE: epoch %v (3 = adopted, more = fenced and restarted)", h["epoch"])
	recordHistory(t, pool.WorkflowID(id, "k1"), "pool-adopted-after-worker-kill")

	// 3. Never back: the engine exits by its lease.
	enginePID = int(h["pid"].(float64))
	w.signal(t, syscall.SIGKILL)
	w.wait(t, 10*time.Second)
	testenv.Eventually(t, 90*time.Second, "orphaned engine exits", func() (bool, string) {
		return !testenv.Alive(enginePID), fmt.Sprint(enginePID)
	})
	require.Empty(t, testenv.EnginePIDs("k1"), "no orphaned engine")
}

// Reload: the new model's engine starts beside the old one, which serves
// until the switch and is then stopped; a reload to a model whose engine
// cannot start leaves the serving engine alone.
func TestPoolReload(t *testing.T) {
	c := newCluster(t)
	id := "e2e-reload"
	w := c.onlineWorker(id)
	h := c.readyPool(id, "r1", "reload-a", 51, "")
	oldPID := int(h["pid"].(float64))
	path, _, _ := tinyModel(t, modelstore.TinyOptions{Seed: 52})
	c.push("reload-b", path)

	status, body := c.send("POST", "/v2/pools/r1/reload", `{"model_id":"reload-b"}`)
	require.Equal(t, 202, status, body)
	reload := body["reload"].(map[string]any)
	require.Equal(t, pool.SideBySide, reload["mode"])
	require.Equal(t, "reload-a", reload["from_model"])
	testenv.Eventually(t, 90*time.Second, "reload done", func() (bool, string) {
		h = c.poolHealth("r1")
		r, _ := h["reload"].(map[string]any)
		return r != nil && r["step"] == "done" && h["state"] == string(pool.Ready), fmt.Sprint(h)
	})
	require.Equal(t, "reload-b", h["model_id"])
	require.EqualValues(t, 2, h["epoch"])
	require.EqualValues(t, 0, h["restarts"])
	testenv.Eventually(t, 30*time.Second, "old engine stopped", func() (bool, string) {
		return !testenv.Alive(oldPID), fmt.Sprint(oldPID)
	})
	var hf pool.Handoff
	require.NoError(t, json.Unmarshal(mustReadFile(t, pool.HandoffPath(c.home+"/nodes/"+id+"/runtime", "r1")), &hf))
	require.Equal(t, "reload-b", hf.Model.ID)
	res, err := http.Post(h["url"].(string)+"/completion", "application/json", strings.NewReader(`{"prompt":"the","n_predict":4}`))
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode)

	// A model llama.cpp cannot load: the reload fails, the engine serving
	// reload-b goes on.
	bad := filepath.Join(t.TempDir(), "bad.gguf")
	require.NoError(t, os.WriteFile(bad, wrongShapes(t, path), 0o644))
	c.push("reload-bad", bad)
	servingPID := int(h["pid"].(float64))
	status, body = c.send("POST", "/v2/pools/r1/reload", `{"model_id":"reload-bad"}`)
	if status == 202 { // the mode is known before the engine fails
		testenv.Eventually(t, 90*time.Second, "reload failed", func() (bool, string) {
			h = c.poolHealth("r1")
			r, _ := h["reload"].(map[string]any)
			return r != nil && r["step"] == "failed", fmt.Sprint(h)
		})
	} else {
		require.Equal(t, 409, status, body)
		require.Equal(t, "RELOAD_FAILED", body["code"])
		h = c.poolHealth("r1")
	}
	require.Contains(t, h["reload"].(map[string]any)["error"], "the old engine keeps serving")
	require.Equal(t, string(pool.Ready), h["state"])
	require.Equal(t, "reload-b", h["model_id"])
	require.Equal(t, servingPID, int(h["pid"].(float64)))
	require.True(t, testenv.Alive(servingPID))

	// Bad requests.
	for _, tc := range []struct {
		path, body, code string
		status           int
	}{
		{"/v2/pools/r1/reload", `{"model_id":"../etc"}`, "INVALID_PARAMS", 400},
		{"/v2/pools/r1/reload", `{"model_id":"reload-b","deadline_ms":-1}`, "INVALID_PARAMS", 400},
		{"/v2/pools/r1/reload", `{"model_id":"nope"}`, "MODEL_NOT_FOUND", 404},
		{"/v2/pools/ghost/reload", `{"model_id":"reload-b"}`, "POOL_NOT_FOUND", 404},
	} {
		status, body := c.send("POST", tc.path, tc.body)
		require.Equal(t, tc.status, status, "%s %s: %v", tc.path, tc.body, body)
		require.Equal(t, tc.code, body["code"], body)
	}
	recordHistory(t, pool.WorkflowID(id, "r1"), "pool-reloaded")

	// SIGTERM: the node leaves and takes its engine along; the pool says so
	// and keeps its failure budget.
	w.signal(t, syscall.SIGTERM)
	require.Zero(t, w.wait(t, 30*time.Second))
	c.waitState(id, node.Left, 20*time.Second)
	require.False(t, testenv.Alive(servingPID), "a worker that shuts down stops its engines")
	h = c.waitPool("r1", pool.Unready, 30*time.Second)
	require.Contains(t, h["last_error"], "NODE_LEFT")
}

func mustReadFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return b
}

// poolEnginePIDs are the live engine processes of a pool (any node).
// wrongShapes is a model file whose header and metadata are valid GGUF
// (the catalog accepts it) but whose llama.embedding_length disagrees with
// its tensors' shapes, so llama.cpp refuses to load it.
func wrongShapes(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	key := []byte("llama.embedding_length")
	i := bytes.Index(data, key)
	require.Positive(t, i)
	i += len(key)
	const ggufUint32 = 4
	require.EqualValues(t, ggufUint32, binary.LittleEndian.Uint32(data[i:]))
	v := binary.LittleEndian.Uint32(data[i+4:])
	binary.LittleEndian.PutUint32(data[i+4:], 2*v)
	return data
}
