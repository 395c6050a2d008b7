package e2e

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// wholeStream is one task's stream as a reconnecting client read it.
type wholeStream struct {
	evs        []sseEvent
	reconnects int
	err        error // the reader gave up
}

// followWhole reads a task's /v2 stream through addr to its final event,
// as a client behind a load balancer should: a broken connection, a refused
// one or a 5xx is retried with backoff, resuming from the last token with
// Last-Event-ID. tokens counts the token events read (for the caller to
// time a kill).
func followWhole(ctx context.Context, addr, taskID string, tokens *atomic.Int64) wholeStream {
	var ws wholeStream
	last, started := "", false
	backoff := 50 * time.Millisecond
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			ws.reconnects++
			select {
			case <-ctx.Done():
				ws.err = fmt.Errorf("task %s: gave up after %d reconnects: %w", taskID, ws.reconnects, ctx.Err())
				return ws
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/v2/tasks/"+taskID+"/events", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		switch {
		case last != "":
			req.Header.Set("Last-Event-ID", last)
		case started:
			req.Header.Set("Last-Event-ID", "-1") // started seen, no token yet
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			continue // refused or reset: the next try may reach another replica
		}
		if res.StatusCode >= 500 {
			res.Body.Close()
			continue
		}
		if res.StatusCode != 200 {
			res.Body.Close()
			ws.err = fmt.Errorf("task %s: GET events: %s", taskID, res.Status)
			return ws
		}
		backoff = 50 * time.Millisecond
		final := false
		testenv.ReadEvents(res.Body, func(ev sseEvent) bool {
			ws.evs = append(ws.evs, ev)
			switch ev.Name {
			case "started":
				started = true
			case "token":
				last = ev.ID
				tokens.Add(1)
			case "end", "error":
				final = true
			}
			return !final
		})
		res.Body.Close()
		if final {
			return ws
		}
		// Ended without its final event: the replica died; reconnect.
	}
}

// Kill -9 of one of three apiserver replicas with 50 streams open through
// the balancer: every client that reconnects through it gets the rest of
// its stream, with no gap and no duplicate; every task completes once,
// unmoved; submissions succeed again within 2 s.
func TestReplicaKillMidStream(t *testing.T) {
	const (
		replicas = 3
		tasks    = 50
		tokensN  = 96
	)
	c := newClusterN(t, replicas)
	id := "e2e-replicas"
	c.onlineWorker(id)
	// Slow enough that 50 generations on one engine thread outlast the
	// kill; 16 slots of 512 tokens each.
	path, _, _ := tinyModel(t, modelstore.TinyOptions{Embd: 512, Layers: 8, Context: 8192, Seed: 73})
	c.push("rk-model", path)
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"rk1","model_id":"rk-model","node_id":"`+id+`","ctx":8192,"slots":16}`)
	require.Equal(t, 202, status, body)
	c.waitPool("rk1", "Ready", 120*time.Second)

	ids := make([]string, tasks)
	for i := range ids {
		ids[i] = testenv.Unique(fmt.Sprintf("t-rk-%02d", i))
		status, body := c.submit(fmt.Sprintf(`{"task_id":%q,"model_ref":"rk-model","prompt":"Once upon a time %d","max_tokens":%d,"determinism":"strict"}`,
			ids[i], i, tokensN))
		require.Equal(t, 202, status, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	streams := make([]wholeStream, tasks)
	var tokens atomic.Int64
	var ended atomic.Int32
	var wg sync.WaitGroup
	for i, tid := range ids {
		wg.Go(func() {
			streams[i] = followWhole(ctx, c.api, tid, &tokens)
			ended.Add(1)
		})
	}

	// Kill once a quarter of all tokens are out, the streams mid-way.
	testenv.Eventually(t, 120*time.Second, "a quarter of the tokens streamed", func() (bool, string) {
		return tokens.Load() >= tasks*tokensN/4, fmt.Sprintf("%d tokens, %d streams ended", tokens.Load(), ended.Load())
	})
	open := tasks - int(ended.Load())
	require.Positive(t, open, "every stream ended before the kill: the model is too fast to test a kill mid-stream")
	trial := testenv.NewTrial(t, "kill -9 of one of 3 apiserver replicas with 50 streams open")
	killedAt := time.Now()
	c.killReplica(1)
	t.Logf("killed replica 2 (%s) with %d of %d streams open, %d tokens streamed", c.replicaAddrs[1], open, tasks, tokens.Load())

	// Submissions through the balancer: one every 100 ms until one is taken.
	var recovered time.Duration
	for probe := 0; ; probe++ {
		status, body := c.submit(fmt.Sprintf(`{"task_id":%q,"model_ref":"rk-model","prompt":"probe","max_tokens":2}`,
			testenv.Unique(fmt.Sprintf("t-rk-probe-%d", probe))))
		if status == 202 {
			recovered = time.Since(killedAt)
			break
		}
		t.Logf("probe %d after %s: %d %v", probe, time.Since(killedAt).Round(time.Millisecond), status, body)
		require.Less(t, time.Since(killedAt), 30*time.Second, "no submission taken after the kill")
		time.Sleep(100 * time.Millisecond) // the probe's pace, not a wait for a condition
	}
	t.Logf("submissions through the balancer succeed again %s after the kill", recovered.Round(time.Millisecond))

	wg.Wait()
	reconnected := 0
	for i, ws := range streams {
		require.NoError(t, ws.err, "task %s", ids[i])
		if ws.reconnects > 0 {
			reconnected++
		}
		// started, tokens 0..n-1 each once in order, end: no gap, no
		// duplicate. Metrics events (queue position while queued) aside.
		var evs []sseEvent
		for _, ev := range ws.evs {
			if ev.Name != "metrics" {
				evs = append(evs, ev)
			}
		}
		ws.evs = evs
		n := checkOrder(t, ws.evs, 0)
		require.Equal(t, tokensN, n, "task %s", ids[i])
		var rec map[string]any
		testenv.Eventually(t, 30*time.Second, ids[i]+" recorded", func() (bool, string) {
			_, rec = c.get("/v2/tasks/" + ids[i])
			return rec["state"] == "Completed", fmt.Sprint(rec)
		})
		require.Equal(t, rec["text"], testenv.Text(ws.evs), "task %s: the stream's text is the recorded one", ids[i])
		migs, _ := rec["migrations"].([]any)
		require.Empty(t, migs, "task %s ran once, where it started", ids[i])
	}
	t.Logf("%d of %d streams reconnected through the balancer; all %d complete", reconnected, tasks, tasks)
	require.Positive(t, reconnected, "no stream was on the killed replica: the kill tested nothing")
	trial.Recovered(recovered, "a submission through the balancer is taken again; every stream complete, no gap or duplicate")
	require.Less(t, recovered, 2*time.Second, "submissions succeed again within 2 s of the kill")
}
