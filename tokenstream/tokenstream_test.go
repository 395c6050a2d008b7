package tokenstream

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

func tok(i int) task.Event {
	return task.Event{Type: "token", I: i, T: string(rune('a' + i%26)), Tok: int32(i)}
}

func TestStreamDedupesAndDetectsGaps(t *testing.T) {
	var h Hub
	s := h.Stream("t")
	have, err := s.Push([]task.Event{{Type: "started", NodeID: "n"}, tok(0), tok(1)})
	require.NoError(t, err)
	require.Equal(t, 2, have)
	have, err = s.Push([]task.Event{{Type: "started", NodeID: "other"}, tok(0), tok(1), tok(2)})
	require.NoError(t, err, "a resend is taken once")
	require.Equal(t, 3, have)
	have, err = s.Push([]task.Event{tok(5)})
	require.ErrorIs(t, err, ErrGap)
	require.Equal(t, 3, have)

	evs, cur, _ := s.Read(Cursor{})
	require.Len(t, evs, 4)
	require.Equal(t, "n", evs[0].NodeID, "the first started event stays")
	require.Equal(t, []int32{0, 1, 2}, s.Progress().Tokens)

	// A cancel ends the stream: later tokens never reach a reader.
	require.True(t, s.Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrCanceled}}))
	_, _ = s.Push([]task.Event{tok(3), {Type: "end"}})
	evs, cur, _ = s.Read(cur)
	require.Len(t, evs, 1)
	require.Equal(t, "error", evs[0].Type)
	require.True(t, cur.Done)
	require.False(t, s.Finish(task.Event{Type: "end"}), "one final event")

	// A reader resuming after token 1 gets 2 and the end only.
	evs, _, _ = s.Read(Cursor{Started: true, Next: 2})
	require.Len(t, evs, 2)
	require.Equal(t, 2, evs[0].I)
}

func TestSinkToken(t *testing.T) {
	key := []byte("k")
	require.True(t, CheckSinkToken(key, "t1", SinkToken(key, "t1")))
	require.False(t, CheckSinkToken(key, "t2", SinkToken(key, "t1")))
	require.False(t, CheckSinkToken([]byte("other"), "t1", SinkToken(key, "t1")))
}

// A hub that loses its state (an apiserver restart) gets everything again;
// a sink that fails for a while gets the events once it answers.
func TestPusherRecovers(t *testing.T) {
	var hub atomic.Pointer[Hub]
	hub.Store(&Hub{})
	var down atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "restarting", http.StatusServiceUnavailable)
			return
		}
		require.Equal(t, "Bearer secret", r.Header.Get("Authorization"))
		var b PushBody
		require.NoError(t, json.NewDecoder(r.Body).Decode(&b))
		have, err := hub.Load().Stream("t").Push(b.Events)
		if err != nil {
			w.WriteHeader(http.StatusConflict)
		}
		_ = json.NewEncoder(w).Encode(PushReply{Have: have})
	}))
	defer srv.Close()
	p := NewPusher(task.Sink{URL: srv.URL, Token: "secret"}, "t", nil)
	for i := range 10 {
		p.Send(tok(i))
	}
	waitTokens := func(n int) {
		deadline := time.Now().Add(10 * time.Second)
		for hub.Load().Stream("t").Tokens() < n {
			require.True(t, time.Now().Before(deadline), "hub has %d of %d tokens", hub.Load().Stream("t").Tokens(), n)
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitTokens(10)
	down.Store(true)
	hub.Store(&Hub{}) // restarted, empty
	for i := 10; i < 20; i++ {
		p.Send(tok(i))
	}
	time.Sleep(50 * time.Millisecond) // some sends fail meanwhile
	down.Store(false)
	p.Send(task.Event{Type: "end", TokensOut: 20})
	require.NoError(t, p.Close(10*time.Second))
	s := hub.Load().Stream("t")
	require.Equal(t, 20, s.Tokens(), "everything resent to the empty hub")
	require.True(t, s.Ended())
}
