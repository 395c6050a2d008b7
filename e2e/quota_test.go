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
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

// newLimitedKey is newKey with limits (a JSON object).
func (c *cluster) newLimitedKey(name, limits string) (id, secret string) {
	c.t.Helper()
	status, body := c.send("POST", "/v2/keys", `{"name":"`+name+`","scopes":["inference"],"limits":`+limits+`}`)
	require.Equal(c.t, 201, status, body)
	id, secret = body["key_id"].(string), body["secret"].(string)
	testenv.Eventually(c.t, 10*time.Second, "key "+name+" taken by every replica", func() (bool, string) {
		for _, addr := range c.replicaAddrs {
			if st, b := c.sendTo(addr, secret, "GET", "/v2/tasks/ghost", ""); st == 401 {
				return false, fmt.Sprint(addr, b)
			}
		}
		return true, ""
	})
	return id, secret
}

// sendTo is sendAs against one replica, past the balancer.
func (c *cluster) sendTo(addr, key, method, path, body string) (int, map[string]any) {
	c.t.Helper()
	st, b, _ := c.sendHeaders(addr, key, method, path, body)
	return st, b
}

// sendHeaders sends to addr with key's token; the answer's status, JSON
// body (or its raw text) and headers. Safe from several goroutines.
func (c *cluster) sendHeaders(addr, key, method, path, body string) (int, map[string]any, http.Header) {
	req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, map[string]any{"error": err.Error()}, nil
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	if out == nil {
		out = map[string]any{"raw": string(raw)}
	}
	return res.StatusCode, out, res.Header
}

// quotaAnswer is one submission's outcome.
type quotaAnswer struct {
	status     int
	body       map[string]any
	retryAfter string
}

// submitTo posts a task to replica addr with key, keeping Retry-After.
func (c *cluster) submitTo(addr, key, body string) quotaAnswer {
	c.t.Helper()
	st, b, h := c.sendHeaders(addr, key, "POST", "/v2/tasks", body)
	return quotaAnswer{status: st, body: b, retryAfter: h.Get("Retry-After")}
}

// waitDone waits for task id to be Completed (read with key) and returns
// its status.
func (c *cluster) waitDone(key, id string) map[string]any {
	c.t.Helper()
	var rec map[string]any
	testenv.Eventually(c.t, 120*time.Second, "task "+id+" completed", func() (bool, string) {
		var st int
		st, rec = c.sendAs(key, "GET", "/v2/tasks/"+id, "")
		return st == 200 && rec["state"] == string(task.Completed), fmt.Sprint(st, rec["state"], rec["error"])
	})
	return rec
}

// keyCounter sums a per-key counter over every replica's /metrics.
func (c *cluster) keyCounter(name, keyID string) float64 {
	c.t.Helper()
	sum := 0.0
	for _, addr := range c.replicaAddrs {
		st, b, _ := c.sendHeaders(addr, token, "GET", "/metrics", "")
		require.Equal(c.t, 200, st, "/metrics of %s", addr)
		sc := bufio.NewScanner(strings.NewReader(b["raw"].(string)))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		prefix := name + `{key_id="` + keyID + `"} `
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
				f, err := strconv.ParseFloat(v, 64)
				require.NoError(c.t, err, sc.Text())
				sum += f
			}
		}
	}
	return sum
}

func num(m map[string]any, k string) int {
	f, _ := m[k].(float64)
	return int(f)
}

// Quotas with real keys, two replicas, a real node: a key with
// concurrent_tasks=2 and requests_per_minute=6 gets exactly 2 of 12
// submissions racing from both replicas while they run, the rest 429
// QUOTA_EXCEEDED with Retry-After; once they end, more are admitted up to
// 6 in the minute, then 429 naming requests_per_minute. The key reads its
// own usage (requests, tokens) and llorch_key_tokens_out_total summed over
// the replicas equals the tokens its tasks returned. A key without limits
// is metered too, from its tasks' ends.
func TestQuotaWithRealKeys(t *testing.T) {
	c := newClusterN(t, 2)
	id := "e2e-quota"
	w := c.onlineWorker(id)
	c.slowPool(id, "qp1", "quota-slow")
	keyID, key := c.newLimitedKey("quota-app", `{"concurrent_tasks":2,"requests_per_minute":6}`)

	// 12 racing, alternating replicas; long enough to run through the race.
	var mu sync.Mutex
	got := map[string]quotaAnswer{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range 12 {
		tid := fmt.Sprintf("q-race-%d", i)
		addr := c.replicaAddrs[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			a := c.submitTo(addr, key, `{"task_id":"`+tid+`","model_ref":"quota-slow","prompt":"the","max_tokens":800,"temperature":0.7,"seed":9}`)
			mu.Lock()
			got[tid] = a
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	var admitted []string
	for tid, a := range got {
		switch a.status {
		case 202:
			admitted = append(admitted, tid)
		case 429:
			require.Equal(t, "QUOTA_EXCEEDED", a.body["code"], a.body)
			require.Contains(t, a.body["message"], "concurrent_tasks", a.body)
			require.Equal(t, "1", a.retryAfter, "a concurrency refusal: retry soon")
		default:
			t.Fatalf("task %s: HTTP %d %v", tid, a.status, a.body)
		}
	}
	require.Len(t, admitted, 2, "exactly concurrent_tasks admitted while they run: %v", got)
	tokensOut, tokensIn := 0, 0
	for _, tid := range admitted {
		rec := c.waitDone(key, tid)
		tokensOut += num(rec, "tokens_out")
		tokensIn += num(rec, "tokens_in")
	}
	require.Positive(t, tokensOut)

	// Freed: two at a time, up to 6 in the minute.
	for round := range 2 {
		var ids []string
		for j := range 2 {
			tid := fmt.Sprintf("q-more-%d-%d", round, j)
			a := c.submitTo(c.replicaAddrs[j], key, `{"task_id":"`+tid+`","model_ref":"quota-slow","prompt":"a","max_tokens":12}`)
			require.Equal(t, 202, a.status, "%s: %v", tid, a.body)
			ids = append(ids, tid)
		}
		for _, tid := range ids {
			rec := c.waitDone(key, tid)
			tokensOut += num(rec, "tokens_out")
			tokensIn += num(rec, "tokens_in")
		}
	}
	testenv.Eventually(t, 30*time.Second, "every release applied", func() (bool, string) {
		_, u := c.sendAs(key, "GET", "/v2/keys/"+keyID+"/usage", "")
		return num(u, "concurrent_tasks") == 0, fmt.Sprint(u)
	})
	for _, addr := range c.replicaAddrs {
		a := c.submitTo(addr, key, `{"model_ref":"quota-slow","prompt":"x","max_tokens":4}`)
		require.Equal(t, 429, a.status, a.body)
		require.Equal(t, "QUOTA_EXCEEDED", a.body["code"], a.body)
		require.Contains(t, a.body["message"], "requests_per_minute", a.body)
		ra, err := strconv.Atoi(a.retryAfter)
		require.NoError(t, err, "Retry-After %q", a.retryAfter)
		require.True(t, ra >= 1 && ra <= 60, "Retry-After %d: until the window frees", ra)
	}

	// The key's own usage, from either replica; the counters over both.
	for _, addr := range c.replicaAddrs {
		st, u := c.sendTo(addr, key, "GET", "/v2/keys/"+keyID+"/usage", "")
		require.Equal(t, 200, st, u)
		require.Equal(t, true, u["metered"], u)
		require.Equal(t, 6, num(u, "requests"), u)
		require.Equal(t, 6, num(u, "requests_last_minute"), u)
		require.Equal(t, tokensOut, num(u, "tokens_out"), u)
		require.Equal(t, tokensIn, num(u, "tokens_in"), u)
	}
	require.Equal(t, float64(tokensOut), c.keyCounter("llorch_key_tokens_out_total", keyID))
	require.Equal(t, float64(tokensIn), c.keyCounter("llorch_key_tokens_in_total", keyID))
	require.Equal(t, 6.0, c.keyCounter("llorch_key_requests_total", keyID))

	// A key without limits: no admission round trip, metered at its end.
	freeID, free := c.newKey("quota-free")
	st, body := c.sendAs(free, "POST", "/v2/tasks", `{"task_id":"q-free","model_ref":"quota-slow","prompt":"b","max_tokens":10}`)
	require.Equal(t, 202, st, body)
	rec := c.waitDone(free, "q-free")
	testenv.Eventually(t, 30*time.Second, "the unlimited key metered", func() (bool, string) {
		_, u := c.sendAs(free, "GET", "/v2/keys/"+freeID+"/usage", "")
		return u["metered"] == true && num(u, "requests") == 1, fmt.Sprint(u)
	})
	_, u := c.sendAs(free, "GET", "/v2/keys/"+freeID+"/usage", "")
	require.Equal(t, num(rec, "tokens_out"), num(u, "tokens_out"), u)
	require.Equal(t, num(rec, "tokens_in"), num(u, "tokens_in"), u)
	require.Equal(t, 0, num(u, "concurrent_tasks"), u)
	require.Equal(t, float64(num(rec, "tokens_out")), c.keyCounter("llorch_key_tokens_out_total", freeID))
	require.Equal(t, 1.0, c.keyCounter("llorch_key_requests_total", freeID))
	c.leave(w, id)
}
