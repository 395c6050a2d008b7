package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"

	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

// scrape reads a /metrics page.
func scrape(t *testing.T, addr string) string {
	t.Helper()
	res, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	return string(raw)
}

// The fast start, end to end: a /v2 task's generation goes to its node
// over the link while its workflow starts, runs there once (its Generate
// activity takes it over: the node decoded the task's tokens once), and
// its history records the fast start; a /v1 stream too. A generation sent
// ahead of a workflow that never starts (its replica died in between) is
// cancelled by the node within --fast-start-claim, its slot freed.
func TestFastStart(t *testing.T) {
	c := newCluster(t, "LLORCH_LINK_TOKEN="+linkToken)
	id := "e2e-fast"
	port, err := testenv.FreePort()
	require.NoError(t, err)
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", port)
	c.onlineWorker(id, "LLORCH_LINK_TOKEN="+linkToken, "--metrics-addr", metricsAddr, "--fast-start-claim", "2s")
	h := c.readyPool(id, "fp1", "fast-tiny", 73, `,"slots":2,"ctx":4096`)

	status, body := c.submit(`{"task_id":"t-fast","model_ref":"fast-tiny","prompt":"Once upon a time","max_tokens":40,"determinism":"strict"}`)
	require.Equal(t, 202, status, body)
	ch, stop := c.events("t-fast", "")
	evs, text := collect(t, ch, 60*time.Second)
	stop()
	require.Equal(t, 40, checkOrder(t, evs, 0))
	require.Equal(t, greedy(t, h["url"].(string), "Once upon a time", 40), text)
	testenv.Eventually(t, 30*time.Second, "the task recorded", func() (bool, string) {
		_, rec := c.get("/v2/tasks/t-fast")
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	m := scrape(t, metricsAddr)
	node := `node_id="` + id + `"`
	require.Contains(t, m, `llorch_node_fast_starts_total{`+node+`,outcome="started"} 1`, m)
	require.Contains(t, m, `llorch_node_fast_starts_total{`+node+`,outcome="claimed"} 1`)
	require.Contains(t, m, `llorch_task_tokens_out_total{`+node+`} 40`, "the node decoded the task's tokens once")
	require.Contains(t, c.metrics(), `llorch_fast_starts_total{outcome="sent"} 1`)
	hist := env.History(t, task.WorkflowID("t-fast"), "")
	markers, generates := 0, 0
	for _, ev := range hist.GetEvents() {
		switch ev.GetEventType() {
		case enumspb.EVENT_TYPE_MARKER_RECORDED:
			var change string
			if p := ev.GetMarkerRecordedEventAttributes().GetDetails()["change-id"]; p != nil {
				_ = env.DataConverter().FromPayloads(p, &change)
			}
			if change == "fast-start" {
				markers++
			}
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
			if ev.GetActivityTaskScheduledEventAttributes().GetActivityType().GetName() == "Generate" {
				generates++
			}
		}
	}
	require.Equal(t, 1, markers, "the fast-start version marker")
	require.Equal(t, 1, generates, "one generation, taken over")
	recordHistory(t, task.WorkflowID("t-fast"), "task-fast-start")

	// /v1 streaming: the stream need not wait for the durable start.
	res, err := http.DefaultClient.Do(authed(t, "POST", "http://"+c.api+"/v1/completions",
		`{"model":"fast-tiny","prompt":"Once upon a time","max_tokens":16,"temperature":0,"stream":true}`))
	require.NoError(t, err)
	raw, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode, string(raw))
	require.Contains(t, string(raw), `"finish_reason":"length"`)
	require.Contains(t, string(raw), "data: [DONE]")
	testenv.Eventually(t, 30*time.Second, "the /v1 task claimed too", func() (bool, string) {
		m := scrape(t, metricsAddr)
		return strings.Contains(m, `llorch_node_fast_starts_total{`+node+`,outcome="claimed"} 2`), m
	})

	// A replica that sent a generation ahead and died before its workflow
	// started: the node cancels it unclaimed; no task exists, the slot is
	// free again.
	// A slower model: 2000 tokens take longer than the 2 s bound.
	slow := c.slowPool(id, "fp-slow", "fast-slow")
	var nodeInfo map[string]any
	_, nodeInfo = c.get("/v2/nodes/" + id)
	lc := &link.Client{URL: nodeInfo["inventory"].(map[string]any)["link_url"].(string), Token: linkToken}
	where := task.Where{NodeID: id, PoolID: "fp-slow", URL: slow["url"].(string), Epoch: int64(slow["epoch"].(float64))}
	orphan := task.Request{TaskID: "t-orphan", ModelID: "fast-tiny", Prompt: "the", Priority: task.Interactive,
		Params: task.Params{MaxTokens: 2000, Temperature: 0.7, TopK: 40, TopP: 0.95, Seed: 5}, EnqueuedAt: time.Now(), FastStart: &where}
	require.NoError(t, lc.Generate(context.Background(), orphan))
	testenv.Eventually(t, 30*time.Second, "the unclaimed generation cancelled by the node", func() (bool, string) {
		m := scrape(t, metricsAddr)
		return strings.Contains(m, `llorch_node_fast_starts_total{`+node+`,outcome="abandoned"} 1`), m
	})
	testenv.Eventually(t, 30*time.Second, "its slot free", func() (bool, string) {
		st, err := lc.State(context.Background())
		if err != nil {
			return false, fmt.Sprint(err)
		}
		for _, p := range st.Pools {
			if p.PoolID == "fp-slow" {
				return p.SlotsBusy == 0, fmt.Sprint(st.Pools)
			}
		}
		return false, fmt.Sprint(st.Pools)
	})
	status, _ = c.get("/v2/tasks/t-orphan")
	require.Equal(t, 404, status, "no workflow: nothing was durable")
	require.Error(t, lc.Generate(context.Background(), orphan), "the node does not run it a second time")
}

func authed(t *testing.T, method, url, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	return req
}
