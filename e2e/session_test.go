package e2e

import (
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/testenv"
)

// startExtraAPI starts another apiserver replica (extraAPI) and returns
// the cluster as seen through it.
func (c *cluster) startExtraAPI() *cluster {
	r := *c
	r.api = c.extraAPI()
	return &r
}

// A session is the same whichever replica answers: turns alternate between
// two apiservers and count as one session, both read the same session,
// two replicas racing for the last turn give it to one task, the ninth turn
// is refused by either, and an end through one is seen by the other. A task
// that cannot start gives its turn back.
func TestSessionsSharedByReplicas(t *testing.T) {
	a := newCluster(t)
	id := "e2e-sessions"
	w := a.onlineWorker(id)
	a.readyPool(id, "sp1", "sess-tiny", 81, `,"slots":2`)
	b := a.startExtraAPI()
	replicas := []*cluster{a, b}

	sid := testenv.Unique("e2e-sess")
	turn := func(c *cluster, prompt string) (int, map[string]any) {
		return c.submit(fmt.Sprintf(`{"session_id":%q,"model_ref":"sess-tiny","prompt":%q,"max_tokens":2}`, sid, prompt))
	}
	var taskIDs []any
	for i := range session.MaxTurns - 1 {
		status, body := turn(replicas[i%2], fmt.Sprint("turn ", i))
		require.Equal(t, 202, status, body)
		taskIDs = append(taskIDs, body["task_id"])
	}
	// Both replicas race for the last turn: exactly one task gets it.
	var mu sync.Mutex
	statuses := map[int]int{}
	var wg sync.WaitGroup
	for _, c := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body := turn(c, "the last turn")
			mu.Lock()
			defer mu.Unlock()
			statuses[status]++
			if status == 202 {
				taskIDs = append(taskIDs, body["task_id"])
			} else {
				require.Equal(t, "SESSION_TURN_LIMIT", body["code"], body)
			}
		}()
	}
	wg.Wait()
	require.Equal(t, map[int]int{202: 1, 409: 1}, statuses, "the last turn goes to one of two racing replicas")
	for _, c := range replicas {
		status, body := turn(c, "one more")
		require.Equal(t, 409, status, body)
		require.Equal(t, "SESSION_TURN_LIMIT", body["code"], body)
	}

	_, fromA := a.get("/v2/sessions/" + sid)
	status, fromB := b.get("/v2/sessions/" + sid)
	require.Equal(t, 200, status, fromB)
	require.EqualValues(t, session.MaxTurns, fromB["turns"])
	require.EqualValues(t, session.MaxTurns, fromB["max_turns"])
	require.Equal(t, "sess-tiny", fromB["model_id"])
	require.Equal(t, taskIDs, fromB["task_ids"])
	require.Positive(t, fromB["ttl_ms"])
	for _, k := range []string{"session_id", "model_id", "turns", "task_ids", "created_at", "last_used", "expires_at"} {
		require.Equal(t, fromA[k], fromB[k], "%s is the same through either replica", k)
	}

	status, _ = b.send("DELETE", "/v2/sessions/"+sid, "")
	require.Equal(t, 204, status)
	for _, c := range replicas {
		status, body := c.get("/v2/sessions/" + sid)
		require.Equal(t, 404, status, body)
		require.Equal(t, "SESSION_NOT_FOUND", body["code"])
	}
	for _, path := range []string{"/v2/sessions/" + sid, "/v2/sessions/never-" + sid} {
		status, body := a.send("DELETE", path, "")
		require.Equal(t, 404, status, body)
		require.Equal(t, "SESSION_NOT_FOUND", body["code"])
	}
	status, body := b.get("/v2/sessions/never-" + sid)
	require.Equal(t, 404, status, body)
	require.Equal(t, "SESSION_NOT_FOUND", body["code"])
	recordHistory(t, session.WorkflowID(sid), "session-turns-limit-ended")

	// After its end the id starts a fresh session.
	status, body = turn(b, "again")
	require.Equal(t, 202, status, body)
	status, body = a.get("/v2/sessions/" + sid)
	require.Equal(t, 200, status, body)
	require.Equal(t, []any{body["task_ids"].([]any)[0]}, body["task_ids"])
	status, _ = a.send("DELETE", "/v2/sessions/"+sid, "")
	require.Equal(t, 204, status)

	// A task that cannot start (its id is taken) gives back the turn it
	// took: the session it would have started does not exist.
	taken, rel := testenv.Unique("e2e-sess-task"), testenv.Unique("e2e-sess-rel")
	status, body = a.submit(fmt.Sprintf(`{"task_id":%q,"model_ref":"sess-tiny","prompt":"x","max_tokens":2}`, taken))
	require.Equal(t, 202, status, body)
	status, body = b.submit(fmt.Sprintf(`{"task_id":%q,"session_id":%q,"model_ref":"sess-tiny","prompt":"x","max_tokens":2}`, taken, rel))
	require.Equal(t, 409, status, body)
	require.Equal(t, "TASK_EXISTS", body["code"])
	status, body = a.get("/v2/sessions/" + rel)
	require.Equal(t, 404, status, body)
	recordHistory(t, session.WorkflowID(rel), "session-turn-given-back")
	a.leave(w, id)
}
