package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/testenv"
)

// sendAs is send with key's token ("" for none).
func (c *cluster) sendAs(key, method, path, body string, header ...string) (int, map[string]any) {
	c.t.Helper()
	req, _ := http.NewRequest(method, "http://"+c.api+path, strings.NewReader(body))
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	defer res.Body.Close()
	var out map[string]any
	if res.Header.Get("Content-Type") == "text/event-stream" {
		return res.StatusCode, nil // a stream: its status is the answer
	}
	raw, _ := io.ReadAll(res.Body)
	_ = json.Unmarshal(raw, &out)
	if out == nil {
		out = map[string]any{"raw": string(raw)}
	}
	return res.StatusCode, out
}

// newKey creates an inference key with the bootstrap token and waits
// until every replica takes it (each polls the registry).
func (c *cluster) newKey(name string) (id, secret string) {
	c.t.Helper()
	status, body := c.send("POST", "/v2/keys", `{"name":"`+name+`","scopes":["inference"]}`)
	require.Equal(c.t, 201, status, body)
	id, secret = body["key_id"].(string), body["secret"].(string)
	testenv.Eventually(c.t, 10*time.Second, "key "+name+" taken by every replica", func() (bool, string) {
		for range 4 { // round robin: each replica answers in turn
			if st, b := c.sendAs(secret, "GET", "/v2/tasks/ghost", ""); st == 401 {
				return false, fmt.Sprint(b)
			}
		}
		return true, ""
	})
	return id, secret
}

// Rotation with a stream open, across two replicas: a task submitted with
// key A streams on while key B is created and A revoked; A then gets 401
// (a reconnect needs a live key). Another key never sees A's task (404,
// as for a task that does not exist); the admin does, with its owner.
func TestKeyRotationWithStreamOpen(t *testing.T) {
	c := newClusterN(t, 2)
	id := "e2e-keys"
	w := c.onlineWorker(id)
	c.slowPool(id, "kp1", "keys-slow")
	aID, a := c.newKey("app-a")
	_, other := c.newKey("app-other")

	status, body := c.sendAs(a, "POST", "/v2/tasks", `{"task_id":"t-rot","model_ref":"keys-slow","prompt":"the","max_tokens":1500,"temperature":0.7,"seed":5}`)
	require.Equal(t, 202, status, body)
	ch, stop := testenv.Follow(t, c.api, a, "t-rot", "")
	defer stop()
	var evs []sseEvent
	for ev := range ch {
		evs = append(evs, ev)
		if ev.Name == "token" && ev.Data["i"].(float64) >= 5 {
			break
		}
	}

	// Another key: the task does not exist for it.
	for _, r := range [][2]string{{"GET", "/v2/tasks/t-rot"}, {"GET", "/v2/tasks/t-rot/events"}, {"POST", "/v2/tasks/t-rot/cancel"}} {
		status, body := c.sendAs(other, r[0], r[1], "")
		require.Equal(t, 404, status, "%s %s: %v", r[0], r[1], body)
		require.Equal(t, "TASK_NOT_FOUND", body["code"], "%s %s", r[0], r[1])
	}
	status, rec := c.get("/v2/tasks/t-rot")
	require.Equal(t, 200, status, rec)
	require.Equal(t, aID, rec["owner"], "the admin sees the task and its owner")

	// Rotate: B is created, A revoked, while A's stream is open.
	_, b := c.newKey("app-b")
	status, body = c.send("DELETE", "/v2/keys/"+aID, "")
	require.Equal(t, 200, status, body)
	testenv.Eventually(t, 2*time.Second, "A refused by every replica", func() (bool, string) {
		for range 4 {
			if st, body := c.sendAs(a, "GET", "/v2/tasks/t-rot", ""); st != 401 {
				return false, fmt.Sprint(st, body)
			}
		}
		return true, ""
	})
	rest, _ := collect(t, ch, 120*time.Second)
	evs = append(evs, rest...)
	n := checkOrder(t, evs, 0)
	require.Equal(t, 1500, n, "the stream opened under A ran to its end after A was revoked")

	st, _ := c.sendAs(a, "GET", "/v2/tasks/t-rot/events", "", "Last-Event-ID", "9")
	require.Equal(t, 401, st, "a reconnect needs a live key")
	st, _ = c.sendAs(b, "GET", "/v2/tasks/t-rot/events", "", "Last-Event-ID", "9")
	require.Equal(t, 404, st, "B is another key: A's tasks stay A's (or an admin's)")
	ch, stop2 := c.events("t-rot", "9")
	evs, _ = collect(t, ch, 30*time.Second)
	stop2()
	checkOrder(t, evs, 10)
	recordHistory(t, apikey.RegistryWorkflowID, "apikeys-created-revoked")
	c.leave(w, id)
}
