package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

// sseEvent is one server-sent event.
type sseEvent struct {
	ID, Name string
	Data     map[string]any
}

// events follows a task's /v2 stream; it delivers each event on the channel
// and closes it at the end of the stream.
func (c *cluster) events(taskID string, lastID string) (<-chan sseEvent, func()) {
	req, _ := http.NewRequest("GET", "http://"+c.api+"/v2/tasks/"+taskID+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	require.Equal(c.t, 200, res.StatusCode)
	require.Equal(c.t, "text/event-stream", res.Header.Get("Content-Type"))
	out := make(chan sseEvent, 1024)
	go func() {
		defer close(out)
		sc := bufio.NewScanner(res.Body)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.Name != "" {
					out <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "id: "):
				ev.ID = line[4:]
			case strings.HasPrefix(line, "event: "):
				ev.Name = line[7:]
			case strings.HasPrefix(line, "data: "):
				_ = json.Unmarshal([]byte(line[6:]), &ev.Data)
			}
		}
	}()
	var once sync.Once
	return out, func() { once.Do(func() { res.Body.Close() }) }
}

// collect reads a stream to its end: the events, and the text of its tokens.
func collect(t *testing.T, ch <-chan sseEvent, timeout time.Duration) ([]sseEvent, string) {
	t.Helper()
	var evs []sseEvent
	var text strings.Builder
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return evs, text.String()
			}
			evs = append(evs, ev)
			if ev.Name == "token" {
				text.WriteString(ev.Data["t"].(string))
			}
		case <-deadline:
			t.Fatalf("stream not done within %s; got %d events", timeout, len(evs))
		}
	}
}

// checkOrder: started, then tokens 0..n-1 in order, then end with n.
func checkOrder(t *testing.T, evs []sseEvent, from int) int {
	t.Helper()
	require.NotEmpty(t, evs)
	i := 0
	if from == 0 {
		require.Equal(t, "started", evs[0].Name, "first event: %v", evs[0].Data)
		i = 1
	}
	next := from
	for ; i < len(evs)-1; i++ {
		if evs[i].Name == "metrics" {
			continue
		}
		require.Equal(t, "token", evs[i].Name, "event %d", i)
		require.EqualValues(t, next, evs[i].Data["i"], "token index")
		require.Equal(t, strconv.Itoa(next), evs[i].ID)
		next++
	}
	last := evs[len(evs)-1]
	require.Equal(t, "end", last.Name, "%v", last.Data)
	require.EqualValues(t, next, last.Data["tokens_out"])
	return next
}

// greedy asks an engine directly: the reference for strict tasks.
func greedy(t *testing.T, url, prompt string, n int) string {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "n_predict": n, "temperature": 0})
	res, err := http.Post(url+"/completion", "application/json", strings.NewReader(string(body)))
	require.NoError(t, err)
	defer res.Body.Close()
	var out struct {
		Content string `json:"content"`
	}
	b, _ := io.ReadAll(res.Body)
	require.NoError(t, json.Unmarshal(b, &out), string(b))
	return out.Content
}

func (c *cluster) submit(body string) (int, map[string]any) {
	return c.send("POST", "/v2/tasks", body)
}

// Tasks through /v2: admission, ordered SSE events whose text equals the
// engine's own greedy output, the task's record, resuming a stream with
// Last-Event-ID, cancel mid-stream, and the errors of bad requests.
func TestTasksV2(t *testing.T) {
	c := newCluster(t)
	id := "e2e-tasks"
	w := c.worker(id)
	c.waitState(id, node.Online, 60*time.Second)
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

	// Cancel mid-stream: 204, then an error event and nothing after it.
	status, body = c.submit(`{"task_id":"t-cancel","model_ref":"task-tiny","prompt":"the","max_tokens":3000,"temperature":0.7,"seed":3}`)
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
	w.signal(t, syscall.SIGTERM)
	c.waitState(id, node.Left, 20*time.Second)
}
