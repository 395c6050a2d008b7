package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
)

type sseEvent = testenv.Event

// events follows a task's /v2 stream.
func (c *cluster) events(taskID string, lastID string) (<-chan sseEvent, func()) {
	return testenv.Follow(c.t, c.api, token, taskID, lastID)
}

var (
	collect    = testenv.Collect
	checkOrder = testenv.CheckOrder
	greedy     = testenv.Greedy
)

func (c *cluster) submit(body string) (int, map[string]any) {
	return c.send("POST", "/v2/tasks", body)
}

// Tasks through /v2: admission, ordered SSE events whose text equals the
// engine's own greedy output, the task's record, resuming a stream with
// Last-Event-ID, cancel mid-stream, and the errors of bad requests.
func TestTasksV2(t *testing.T) {
	c := newCluster(t)
	id := "e2e-tasks"
	w := c.onlineWorker(id)
	h := c.readyPool(id, "tp1", "task-tiny", 61, `,"slots":2,"ctx":8192`)
	url := h["url"].(string)

	status, body := c.submit(`{"task_id":"t-one","model_ref":"task-tiny","prompt":"Once upon a time","max_tokens":48,"determinism":"strict"}`)
	require.Equal(t, 202, status, body)
	require.Equal(t, "t-one", body["task_id"])
	require.Contains(t, body, "queue_position")
	require.Contains(t, body, "predicted_start_ms")
	require.Equal(t, "/v2/tasks/t-one/events", body["streams"].(map[string]any)["sse"])
	ch, stop := c.events("t-one", "")
	evs, text := collect(t, ch, 60*time.Second)
	stop()
	n := checkOrder(t, evs, 0)
	require.Equal(t, 48, n)
	require.Equal(t, greedy(t, url, "Once upon a time", 48), text, "the task's text is the engine's greedy output")
	require.Equal(t, id, evs[0].Data["node_id"])
	require.Equal(t, "tp1", evs[0].Data["pool_id"])

	// The end event can come a moment before the workflow records it.
	var rec map[string]any
	testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
		_, rec = c.get("/v2/tasks/t-one")
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	require.Equal(t, text, rec["text"])
	require.EqualValues(t, 48, rec["tokens_out"])
	require.Positive(t, rec["tokens_in"])
	require.NotContains(t, rec, "pieces")

	// Resume after token 9: tokens 10.. and end, nothing before.
	ch, stop = c.events("t-one", "9")
	evs, rest := collect(t, ch, 30*time.Second)
	stop()
	checkOrder(t, evs, 10)
	require.True(t, strings.HasSuffix(text, rest))

	// Cancel mid-stream: 204, then an error event and nothing after it. A
	// slower model, so the generation is surely still running.
	c.slowPool(id, "tp-slow", "task-slow")
	status, body = c.submit(`{"task_id":"t-cancel","model_ref":"task-slow","prompt":"the","max_tokens":3000,"temperature":0.7,"seed":3}`)
	require.Equal(t, 202, status, body)
	ch, stop = c.events("t-cancel", "")
	defer stop()
	seen := 0
	for ev := range ch {
		if ev.Name == "token" {
			seen++
			if seen == 5 {
				break
			}
		}
	}
	status, _ = c.send("POST", "/v2/tasks/t-cancel/cancel", "")
	require.Equal(t, 204, status)
	var after []sseEvent
	for ev := range ch {
		after = append(after, ev)
		if ev.Name == "error" {
			break
		}
	}
	require.NotEmpty(t, after)
	last := after[len(after)-1]
	require.Equal(t, "error", last.Name)
	require.Equal(t, "CANCELED", last.Data["code"])
	// Tokens already on the wire before the 204 may arrive; none after the error.
	_, more := <-ch
	require.False(t, more, "the stream ends with the error")
	testenv.Eventually(t, 30*time.Second, "task canceled", func() (bool, string) {
		_, rec := c.get("/v2/tasks/t-cancel")
		return rec["state"] == "Canceled", fmt.Sprint(rec)
	})
	status, _ = c.send("POST", "/v2/tasks/t-cancel/cancel", "")
	require.Equal(t, 204, status, "cancel is idempotent")
	recordHistory(t, "task:t-cancel", "task-canceled")
	status, body = c.send("POST", "/v2/tasks/t-one/cancel", "")
	require.Equal(t, 409, status, body)
	require.Equal(t, "TASK_ENDED", body["code"])

	// Bad requests.
	for _, tc := range []struct {
		body, code, field string
		status            int
	}{
		{`{"model_ref":"task-tiny"}`, "INVALID_PARAMS", "prompt", 400},
		{`{"model_ref":"task-tiny","prompt":"x","max_tokens":0}`, "INVALID_PARAMS", "max_tokens", 400},
		{`{"model_ref":"task-tiny","prompt":"x","max_tokens":"many"}`, "INVALID_PARAMS", "max_tokens", 400},
		{`{"model_ref":"task-tiny","prompt":"x","deadline_ms":0}`, "INVALID_PARAMS", "deadline_ms", 400},
		{`{"model_ref":"task-tiny","prompt":"x","priority":"urgent"}`, "INVALID_PARAMS", "priority", 400},
		{`{"model_ref":"task-tiny","prompt":"x","temperature":9}`, "INVALID_PARAMS", "temperature", 400},
		{`{"model_ref":"task-tiny","prompt":"x","bogus":1}`, "INVALID_PARAMS", "bogus", 400},
		{`{"model_ref":"task-tiny","prompt":"x","task_id":"../x"}`, "INVALID_PARAMS", "task_id", 400},
		{`{"model_ref":"nope","prompt":"x"}`, "MODEL_NOT_FOUND", "", 404},
		{`{"model_ref":"task-tiny","prompt":"x","placement":{"mode":"pin","pin_pool_id":"ghost"}}`, "POOL_UNAVAILABLE", "", 503},
		{`{"task_id":"t-one","model_ref":"task-tiny","prompt":"x"}`, "TASK_EXISTS", "", 409},
		// The original contract's constraints: tp1 is a built-in pool whose
		// slots hold 4096 tokens.
		{`{"model_ref":"task-tiny","prompt":"x","engine":"llama-server"}`, "POOL_UNAVAILABLE", "", 503},
		{`{"model_ref":"task-tiny","prompt":"x","ctx":4097}`, "POOL_UNAVAILABLE", "", 503},
		{`{"model_ref":"task-tiny","prompt":"x","engine":"vllm"}`, "INVALID_PARAMS", "engine", 400},
		{`{"model_ref":"task-tiny","prompt":"x","workload":"rerank"}`, "INVALID_PARAMS", "workload", 400},
		{`{"model_ref":"task-tiny","prompt":"x","kv_hint":"hot"}`, "INVALID_PARAMS", "kv_hint", 400},
	} {
		status, body := c.submit(tc.body)
		require.Equal(t, tc.status, status, "%s: %v", tc.body, body)
		require.Equal(t, tc.code, body["code"], "%s: %v", tc.body, body)
		if tc.field != "" {
			require.Equal(t, tc.field, body["field"], "%s: %v", tc.body, body)
		}
	}
	status, body = c.get("/v2/tasks/ghost")
	require.Equal(t, 404, status, body)
	require.Equal(t, "TASK_NOT_FOUND", body["code"])
	status, body = c.submit(`{"task_id":"t-contract","model_ref":"task-tiny","prompt":"x","max_tokens":3,"workload":"completion","engine":"llamacpp","ctx":4096}`)
	require.Equal(t, 202, status, body)
	testenv.Eventually(t, 60*time.Second, "the constrained task completed", func() (bool, string) {
		_, rec := c.get("/v2/tasks/t-contract")
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})

	// Sessions: metadata of up to 8 turns.
	for i := range 8 {
		status, body := c.submit(fmt.Sprintf(`{"session_id":"s-1","model_ref":"task-tiny","prompt":"turn %d","max_tokens":2}`, i))
		require.Equal(t, 202, status, body)
	}
	status, body = c.submit(`{"session_id":"s-1","model_ref":"task-tiny","prompt":"one more","max_tokens":2}`)
	require.Equal(t, 409, status, body)
	require.Equal(t, "SESSION_TURN_LIMIT", body["code"])
	status, body = c.get("/v2/sessions/s-1")
	require.Equal(t, 200, status, body)
	require.EqualValues(t, 8, body["turns"])
	require.Len(t, body["task_ids"], 8)
	require.Positive(t, body["ttl_ms"])
	status, _ = c.send("DELETE", "/v2/sessions/s-1", "")
	require.Equal(t, 204, status)
	status, body = c.get("/v2/sessions/s-1")
	require.Equal(t, 404, status, body)
	require.Equal(t, "SESSION_NOT_FOUND", body["code"])
	c.leave(w, id)
}

// slowPool makes a Ready pool of the slow model on nodeID.
func (c *cluster) slowPool(nodeID, poolID, modelID string) map[string]any {
	c.t.Helper()
	c.push(modelID, slowModel(c.t))
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"`+poolID+`","model_id":"`+modelID+`","node_id":"`+nodeID+`","ctx":4096}`)
	require.Equal(c.t, 202, status, body)
	return c.waitPool(poolID, pool.Ready, 120*time.Second)
}

// slowModel is big enough to generate at a few hundred tokens per second
// on one thread, so a node can be killed mid-stream.
func slowModel(t *testing.T) string {
	path, _, _ := tinyModel(t, modelstore.TinyOptions{Embd: 512, Layers: 8, Context: 4096, Seed: 71})
	return path
}

// Kill -9 of the generating node's worker and engine mid-stream: the task
// goes on on the other node's pool from the tokens already produced; the
// stream has no gap and no duplicate and its text equals an uninterrupted
// greedy run. With no other pool left, the client gets WORKER_RESET.
func TestTaskMovesOffLostNode(t *testing.T) {
	c := newCluster(t)
	w1, w2 := c.worker("e2e-mig-1"), c.worker("e2e-mig-2")
	c.waitState("e2e-mig-1", node.Online, 60*time.Second)
	c.waitState("e2e-mig-2", node.Online, 60*time.Second)
	c.push("mig-model", slowModel(t))
	for _, p := range [][2]string{{"e2e-mig-1", "mp1"}, {"e2e-mig-2", "mp2"}} {
		status, body := c.send("POST", "/v2/pools", `{"pool_id":"`+p[1]+`","model_id":"mig-model","node_id":"`+p[0]+`","ctx":4096}`)
		require.Equal(t, 202, status, body)
	}
	h1 := c.waitPool("mp1", pool.Ready, 120*time.Second)
	h2 := c.waitPool("mp2", pool.Ready, 120*time.Second)
	const n = 1200
	want := greedy(t, h2["url"].(string), "Once upon a time", n)

	mig, reset := testenv.Unique("t-mig"), testenv.Unique("t-reset")
	status, body := c.submit(`{"task_id":"` + mig + `","model_ref":"mig-model","prompt":"Once upon a time","max_tokens":1200,
		"determinism":"strict","placement":{"mode":"prefer","prefer_pools":["mp1"]}}`)
	require.Equal(t, 202, status, body)
	ch, stop := c.events(mig, "")
	defer stop()
	var evs []sseEvent
	for ev := range ch {
		evs = append(evs, ev)
		if ev.Name == "token" && ev.Data["i"].(float64) == 100 {
			break
		}
	}
	require.Equal(t, "mp1", evs[0].Data["pool_id"], "the task started on the preferred pool")
	trial := testenv.NewTrial(t, "kill -9 of a worker and its engine mid-generation")
	killedAt := time.Now()
	w1.signal(t, syscall.SIGKILL)
	require.NoError(t, syscall.Kill(int(h1["pid"].(float64)), syscall.SIGKILL))
	evs = append(evs, testenv.UntilResumed(t, ch, 120*time.Second)...)
	resumed := time.Since(killedAt)
	rest, _ := collect(t, ch, 120*time.Second)
	trial.Recovered(resumed, "stream resumed on the other node (completed equal to an uninterrupted run)")
	t.Logf("node lost after 100 tokens; stream resumed %s and complete %s after the kill", resumed, time.Since(killedAt))
	evs = append(evs, rest...)
	got := checkOrder(t, evs, 0)
	require.Equal(t, n, got)
	require.Equal(t, want, testenv.Text(evs), "the moved generation equals an uninterrupted greedy run")
	var rec map[string]any
	testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
		_, rec = c.get("/v2/tasks/" + mig)
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	migs := rec["migrations"].([]any)
	require.Len(t, migs, 1)
	m := migs[0].(map[string]any)
	require.Equal(t, "mp1", m["from"].(map[string]any)["pool_id"])
	require.Equal(t, "mp2", m["to"].(map[string]any)["pool_id"])
	require.GreaterOrEqual(t, m["at_token"].(float64), float64(100))
	require.Equal(t, want, rec["text"])
	if len(c.replicas) > 1 {
		// Through replicas, the reader's replica told the workflow what it
		// had seen (the seen signal) when the node's link broke off.
		recordHistory(t, "task:"+mig, "task-moved-seen-by-replica")
	} else {
		recordHistory(t, "task:"+mig, "task-moved-off-lost-node")
	}

	// No other pool: WORKER_RESET, retriable.
	status, body = c.submit(`{"task_id":"` + reset + `","model_ref":"mig-model","prompt":"the","max_tokens":1200,"determinism":"strict"}`)
	require.Equal(t, 202, status, body)
	ch2, stop2 := c.events(reset, "")
	defer stop2()
	for ev := range ch2 {
		if ev.Name == "token" && ev.Data["i"].(float64) == 50 {
			break
		}
	}
	w2.signal(t, syscall.SIGKILL)
	require.NoError(t, syscall.Kill(int(h2["pid"].(float64)), syscall.SIGKILL))
	evs, _ = collect(t, ch2, 120*time.Second)
	last := evs[len(evs)-1]
	require.Equal(t, "error", last.Name, "%v", last.Data)
	require.Equal(t, "WORKER_RESET", last.Data["code"])
	require.Equal(t, true, last.Data["retriable"])
	if len(c.replicas) > 1 {
		recordHistory(t, "task:"+reset, "task-worker-reset-seen-by-replica")
	} else {
		recordHistory(t, "task:"+reset, "task-worker-reset")
	}
}

func jsonDecode(res *http.Response, v any) error { return json.NewDecoder(res.Body).Decode(v) }

// engineIdle says whether no slot of the engine at url is processing.
func engineIdle(url string) (bool, string) {
	res, err := http.Get(url + "/slots")
	if err != nil {
		return false, err.Error()
	}
	defer res.Body.Close()
	var slots []map[string]any
	if err := jsonDecode(res, &slots); err != nil || len(slots) == 0 {
		return false, fmt.Sprint(slots, err)
	}
	for _, s := range slots {
		if s["is_processing"] != false {
			return false, fmt.Sprint(slots)
		}
	}
	return true, ""
}

// Admission and placement: a full queue answers 429 with Retry-After and
// X-Backoff-Ms; interactive tasks go before batch ones queued earlier;
// pin and avoid; a deadline ends a running task with DEADLINE_EXCEEDED.
func TestAdmissionPriorityPlacementDeadline(t *testing.T) {
	c := newCluster(t, "--queue-capacity", "1")
	id := "e2e-admit"
	w := c.onlineWorker(id)
	c.push("adm-model", slowModel(t))
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"ap1","model_id":"adm-model","node_id":"`+id+`","ctx":4096,"slots":1}`)
	require.Equal(t, 202, status, body)
	c.waitPool("ap1", pool.Ready, 120*time.Second)

	task := func(id, prio string, n int) string {
		return fmt.Sprintf(`{"task_id":%q,"model_ref":"adm-model","prompt":"the","max_tokens":%d,"priority":%q,"determinism":"strict"}`, id, n, prio)
	}
	status, body = c.submit(task("t-a", "interactive", 800))
	require.Equal(t, 202, status, body)
	ch, stop := c.events("t-a", "")
	defer stop()
	for ev := range ch { // A holds the only slot
		if ev.Name == "token" {
			break
		}
	}
	status, body = c.submit(task("t-d", "batch", 8))
	require.Equal(t, 202, status, body)
	status, body = c.submit(task("t-b", "interactive", 8))
	require.Equal(t, 202, status, body)
	require.EqualValues(t, 0, body["queue_position"])
	// B waits at the node, in the pool's queue, ahead of D: its stream
	// says so.
	bch, bstop := c.events("t-b", "")
	defer bstop()
	waited := false
	for ev := range bch {
		require.NotEqual(t, "token", ev.Name, "B waits for A's slot")
		if ev.Name == "metrics" && ev.Data["waiting"] == true {
			require.Equal(t, "ap1", ev.Data["pool_id"])
			require.EqualValues(t, 0, ev.Data["queue_position"])
			waited = true
			break
		}
	}
	require.True(t, waited, "B's stream reported its wait at the node")
	// The refusal counts what the nodes' links show: wait until B's node
	// counts it queued (the replicas follow that link).
	lc := &link.Client{URL: c.node(id)["inventory"].(map[string]any)["link_url"].(string)}
	testenv.Eventually(t, 10*time.Second, "B queued at its node", func() (bool, string) {
		st, err := lc.State(context.Background())
		if err != nil {
			return false, err.Error()
		}
		for _, p := range st.Pools {
			if p.PoolID == "ap1" && p.Queued >= 1 {
				return true, ""
			}
		}
		return false, fmt.Sprint(st.Pools)
	})

	req, _ := http.NewRequest("POST", "http://"+c.api+"/v2/tasks", strings.NewReader(task("t-c", "interactive", 8)))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	var rej map[string]any
	require.NoError(t, jsonDecode(res, &rej))
	res.Body.Close()
	require.Equal(t, 429, res.StatusCode, rej)
	require.Equal(t, "ADMISSION_REJECT", rej["code"])
	require.Equal(t, true, rej["retriable"])
	require.NotEmpty(t, res.Header.Get("Retry-After"))
	backoff, err := strconv.Atoi(res.Header.Get("X-Backoff-Ms"))
	require.NoError(t, err)
	require.Positive(t, backoff)
	status, rec := c.get("/v2/tasks/t-c")
	require.Equal(t, 404, status, "a refused task leaves nothing behind: %v", rec)

	finished := func(id string) time.Time {
		var rec map[string]any
		testenv.Eventually(t, 90*time.Second, id+" completed", func() (bool, string) {
			_, rec = c.get("/v2/tasks/" + id)
			return rec["state"] == "Completed", fmt.Sprint(rec)
		})
		at, err := time.Parse(time.RFC3339Nano, rec["finished_at"].(string))
		require.NoError(t, err)
		return at
	}
	a, b, d := finished("t-a"), finished("t-b"), finished("t-d")
	require.True(t, a.Before(b) && b.Before(d), "interactive B ran before batch D, queued earlier: a %s b %s d %s", a, b, d)

	// Placement rules.
	status, body = c.submit(`{"model_ref":"adm-model","prompt":"x","max_tokens":2,"placement":{"avoid_pools":["ap1"]}}`)
	require.Equal(t, 503, status, body)
	require.Equal(t, "POOL_UNAVAILABLE", body["code"])
	status, body = c.submit(`{"task_id":"t-pin","model_ref":"adm-model","prompt":"x","max_tokens":2,"placement":{"mode":"pin","pin_pool_id":"ap1"}}`)
	require.Equal(t, 202, status, body)
	finished("t-pin")
	_, rec = c.get("/v2/tasks/t-pin")
	require.Equal(t, "ap1", rec["where"].(map[string]any)["pool_id"])

	// A deadline ends a running task.
	status, body = c.submit(`{"task_id":"t-late","model_ref":"adm-model","prompt":"x","max_tokens":3000,"deadline_ms":1500}`)
	require.Equal(t, 202, status, body)
	ch, stop = c.events("t-late", "")
	defer stop()
	evs, _ := collect(t, ch, 60*time.Second)
	last := evs[len(evs)-1]
	require.Equal(t, "error", last.Name)
	require.Equal(t, "DEADLINE_EXCEEDED", last.Data["code"])
	testenv.Eventually(t, 30*time.Second, "late task failed", func() (bool, string) {
		_, rec = c.get("/v2/tasks/t-late")
		return rec["state"] == "Failed", fmt.Sprint(rec)
	})
	recordHistory(t, "task:t-late", "task-deadline")
	recordHistory(t, "task:t-b", "task-completed")
	c.leave(w, id)
}

// SIGTERM of the apiserver mid-stream, then a restart on the same address:
// the generation goes on on the node; the client reconnects with
// Last-Event-ID and gets the rest, and a client that comes back only after
// the task finished gets the rest from the recorded result.
func TestAPIServerRestartMidStream(t *testing.T) {
	c := newCluster(t)
	id := "e2e-apirestart"
	c.onlineWorker(id)
	c.push("rs-model", slowModel(t))
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"rp1","model_id":"rs-model","node_id":"`+id+`","ctx":4096,"slots":2}`)
	require.Equal(t, 202, status, body)
	h := c.waitPool("rp1", pool.Ready, 120*time.Second)
	const n = 1000
	want := greedy(t, h["url"].(string), "Once upon a time", n)

	for _, tc := range []struct {
		name     string
		waitDone bool // reconnect only once the task has finished
	}{{"t-rs-live", false}, {"t-rs-done", true}} {
		id := testenv.Unique(tc.name)
		status, body := c.submit(`{"task_id":"` + id + `","model_ref":"rs-model","prompt":"Once upon a time","max_tokens":1000,"determinism":"strict"}`)
		require.Equal(t, 202, status, body)
		ch, stop := c.events(id, "")
		var first []sseEvent
		for ev := range ch {
			first = append(first, ev)
			if ev.Name == "token" && ev.Data["i"].(float64) == 50 {
				break
			}
		}
		stop()
		scenario := "SIGTERM of the apiserver mid-stream, restart"
		if tc.waitDone {
			scenario += ", client back after the task ended"
		}
		trial := testenv.NewTrial(t, scenario)
		termAt := time.Now()
		c.apiProc.signal(t, syscall.SIGTERM)
		require.Zero(t, c.apiProc.wait(t, 30*time.Second), "apiserver exits 0 on SIGTERM with a stream open")
		exited := time.Since(termAt)
		if tc.waitDone {
			// The node finishes while no apiserver runs; its events go nowhere.
			testenv.Eventually(t, 60*time.Second, "engine idle", func() (bool, string) { return engineIdle(h["url"].(string)) })
		}
		restartAt := time.Now()
		c.startAPI()
		last := first[len(first)-1].ID
		ch, stop = c.events(id, last)
		var rest []sseEvent
		select {
		case ev := <-ch:
			rest = append(rest, ev)
		case <-time.After(60 * time.Second):
			t.Fatal("no event after reconnecting")
		}
		back, since := time.Since(termAt), "SIGTERM"
		if tc.waitDone {
			back, since = time.Since(restartAt), "restart"
		}
		more, _ := collect(t, ch, 120*time.Second)
		rest = append(rest, more...)
		stop()
		checkOrder(t, append(first, rest...), 0)
		t.Logf("%s: apiserver exited %s after SIGTERM; first event after reconnecting %s after the %s", tc.name, exited.Round(time.Millisecond), back.Round(time.Millisecond), since)
		trial.Recovered(back, "first event after reconnecting with Last-Event-ID (from the "+since+"); stream complete and in order")
		require.Equal(t, want, testenv.Text(append(first, rest...)), tc.name)
		testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
			_, rec := c.get("/v2/tasks/" + id)
			return rec["state"] == "Completed", fmt.Sprint(rec)
		})
		recordHistory(t, "task:"+id, "task-apiserver-restarted-"+strings.TrimPrefix(tc.name, "t-rs-"))
	}
}

// With --auto-pools a task for a model no pool serves starts a pool on an
// Online node; the stream shows the preparation (metrics events) and then
// the answer.
func TestTaskStartsPool(t *testing.T) {
	c := newCluster(t, "--auto-pools", "--auto-pool-ctx", "2048")
	id := "e2e-autopool"
	c.onlineWorker(id)
	path, _, _ := tinyModel(t, modelstore.TinyOptions{Seed: 91})
	c.push("auto-tiny", path)
	status, body := c.submit(`{"task_id":"t-auto","model_ref":"auto-tiny","prompt":"the","max_tokens":16,"determinism":"strict"}`)
	require.Equal(t, 202, status, body)
	ch, stop := c.events("t-auto", "")
	defer stop()
	evs, _ := collect(t, ch, 120*time.Second)
	var metrics []map[string]any
	var rest []sseEvent
	for _, ev := range evs {
		if ev.Name == "metrics" {
			metrics = append(metrics, ev.Data)
		} else {
			rest = append(rest, ev)
		}
	}
	require.NotEmpty(t, metrics)
	require.Contains(t, metrics[0]["preparing"], "starting pool auto-auto-tiny-e2e-autopool")
	checkOrder(t, rest, 0)
	require.Equal(t, "auto-auto-tiny-e2e-autopool", rest[0].Data["pool_id"])
	h := c.poolHealth("auto-auto-tiny-e2e-autopool")
	require.Equal(t, "Ready", h["state"])

	// A Retired model takes no new tasks.
	status, body = c.send("POST", "/v2/catalog/models/auto-tiny/state", `{"state":"Retired"}`)
	require.Equal(t, 200, status, body)
	status, body = c.submit(`{"model_ref":"auto-tiny","prompt":"the","max_tokens":4}`)
	require.Equal(t, 410, status, body)
	require.Equal(t, "MODEL_DEPRECATED", body["code"])
}

// A task admitted by one apiserver replica is read through another that
// did not admit it (no stickiness behind a load balancer): its text equals
// the greedy output, and resuming with Last-Event-ID on that replica
// mid-stream gives the rest with no gap and no duplicate.
func TestStreamThroughAnotherReplica(t *testing.T) {
	c := newCluster(t)
	id := "e2e-replica"
	w := c.onlineWorker(id)
	h := c.slowPool(id, "rep1", "rep-model")
	const n = 400
	want := greedy(t, h["url"].(string), "Once upon a time", n)
	api2 := c.extraAPI()

	tid := testenv.Unique("t-replica")
	status, body := c.submit(`{"task_id":"` + tid + `","model_ref":"rep-model","prompt":"Once upon a time","max_tokens":400,"determinism":"strict"}`)
	require.Equal(t, 202, status, body)
	ch, stop := testenv.Follow(t, api2, token, tid, "")
	var first []sseEvent
	for ev := range ch {
		first = append(first, ev)
		if ev.Name == "token" && ev.Data["i"].(float64) == 60 {
			break
		}
	}
	stop()
	require.Equal(t, "rep1", first[0].Data["pool_id"])
	ch, stop = testenv.Follow(t, api2, token, tid, first[len(first)-1].ID)
	rest, _ := collect(t, ch, 120*time.Second)
	stop()
	all := append(first, rest...)
	require.Equal(t, n, checkOrder(t, all, 0))
	require.Equal(t, want, testenv.Text(all), "the text read on the other replica is the greedy output")

	// Read again on the other replica once the task has ended: the whole
	// stream, the same text.
	testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
		_, rec := c.get("/v2/tasks/" + tid)
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	ch, stop = testenv.Follow(t, api2, token, tid, "")
	again, text := collect(t, ch, 60*time.Second)
	stop()
	checkOrder(t, again, 0)
	require.Equal(t, want, text)
	c.leave(w, id)
}
