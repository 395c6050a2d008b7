package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

// A session's next turn goes to the pool, and the slot, whose cache holds
// its history: the engine decodes only what is new (tokens_cached in the
// end event). Each session's first turn prefers pool kc-b; load alone
// would send the next turns to kc-a (both idle, kc-a first by id), so
// turns that stay on kc-b followed the cache. A new session that shares a
// system prompt goes where that prompt is cached. kv_hint cold places by
// load and decodes everything.
func TestSessionTurnsFollowTheirCache(t *testing.T) {
	sessionTurnsFollowTheirCache(t, "")
}

// The same on llama-server pools (LLORCH_LLAMA_SERVER): its id_slot and
// cache_prompt.
func TestSessionTurnsFollowTheirCacheOnLlamaServer(t *testing.T) {
	sessionTurnsFollowTheirCache(t, llamaServerOrSkip(t, "cache-aware routing is not tried on llama-server pools"))
}

func sessionTurnsFollowTheirCache(t *testing.T, llamaServer string) {
	c := newCluster(t)
	id := "e2e-cache"
	args, engine := engineOf(llamaServer)
	spec := `,"slots":2,"ctx":8192` + engine
	w := c.onlineWorker(id, args...)
	// Trained for 4096 tokens: llama-server gives a slot no more.
	path, _, _ := tinyModel(t, modelstore.TinyOptions{Seed: 91, Context: 4096})
	c.push("cache-tiny", path)
	for _, p := range []string{"kc-a", "kc-b"} {
		status, body := c.send("POST", "/v2/pools", `{"pool_id":"`+p+`","model_id":"cache-tiny","node_id":"`+id+`"`+spec+`}`)
		require.Equal(t, 202, status, body)
	}
	for _, p := range []string{"kc-a", "kc-b"} {
		c.waitPool(p, pool.Ready, 90*time.Second)
	}

	system := task.Message{Role: "system", Content: strings.Repeat("You answer in one short line. ", 6)}
	// turn runs one turn of session sid: its pool and the end event.
	turn := func(sid string, msgs []task.Message, extra string) (string, map[string]any, string) {
		m, _ := json.Marshal(msgs)
		status, body := c.submit(fmt.Sprintf(`{"session_id":%q,"model_ref":"cache-tiny","messages":%s,"max_tokens":12,"temperature":0%s}`, sid, m, extra))
		require.Equal(t, 202, status, body)
		ch, stop := c.events(body["task_id"].(string), "")
		defer stop()
		evs, text := collect(t, ch, 60*time.Second)
		require.NotEmpty(t, evs)
		end := evs[len(evs)-1]
		require.Equal(t, "end", end.Name, evs)
		return evs[0].Data["pool_id"].(string), end.Data, text
	}
	session := func(hint string) (pools []string, cached []float64) {
		sid := testenv.Unique("e2e-cache-" + hint)
		msgs := []task.Message{system}
		for i := range 4 {
			msgs = append(msgs, task.Message{Role: "user", Content: fmt.Sprintf("Question %d of session %s: %s", i, sid, strings.Repeat("tell me more. ", 8))})
			extra := `,"kv_hint":"` + hint + `"`
			if i == 0 {
				extra += `,"placement":{"mode":"prefer","prefer_pools":["kc-b"]}`
			}
			p, end, text := turn(sid, msgs, extra)
			pools, cached = append(pools, p), append(cached, end["tokens_cached"].(float64))
			require.Less(t, end["tokens_cached"].(float64), end["tokens_in"].(float64))
			msgs = append(msgs, task.Message{Role: "assistant", Content: text})
		}
		return pools, cached
	}

	pools, cached := session(task.KVReuse)
	t.Logf("reuse: pools %v, prompt tokens from the cache %v", pools, cached)
	require.Equal(t, []string{"kc-b", "kc-b", "kc-b", "kc-b"}, pools, "the turns follow the session's cache")
	require.Zero(t, cached[0], "the first turn has no history to find")
	for i, n := range cached[1:] {
		require.Positive(t, n, "turn %d reuses the history", i+2)
	}

	// A new session with the same system prompt, no preference: it goes
	// where the prompt is cached (only kc-b has served it).
	p, end, _ := turn(testenv.Unique("e2e-cache-new"), []task.Message{system, {Role: "user", Content: "hello"}}, "")
	require.Equal(t, "kc-b", p)
	require.Positive(t, end["tokens_cached"], "the shared system prompt is reused")

	pools, cached = session(task.KVCold)
	t.Logf("cold: pools %v, prompt tokens from the cache %v", pools, cached)
	require.Equal(t, []string{"kc-b", "kc-a", "kc-a", "kc-a"}, pools, "cold: load alone")
	require.Equal(t, []float64{0, 0, 0, 0}, cached)
	c.leave(w, id)
}
