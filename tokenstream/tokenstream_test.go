package tokenstream

import (
	"context"
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

// A stream opened at a base takes its first token there; a reader from
// below the base gets what exists from the base.
func TestStreamBase(t *testing.T) {
	var h Hub
	s := h.Open("t", 5)
	_, err := s.Push([]task.Event{tok(4)})
	require.NoError(t, err, "below the base: not held here, skipped")
	have, err := s.Push([]task.Event{tok(6)})
	require.ErrorIs(t, err, ErrGap)
	require.Equal(t, 5, have)
	have, err = s.Push([]task.Event{tok(5), tok(6)})
	require.NoError(t, err)
	require.Equal(t, 7, have)
	require.Equal(t, 7, s.Tokens())
	evs, cur, _ := s.Read(Cursor{Started: true})
	require.Len(t, evs, 2)
	require.Equal(t, 5, evs[0].I)
	require.Equal(t, 7, cur.Next)
	require.Empty(t, s.Progress().Tokens, "a stream lacking its first tokens is no resume point")

	// A newer generation replaces the stream; the old one's readers end.
	s2 := h.Open("t", 0)
	require.True(t, s.Ended())
	evs, _, _ = s.Read(cur)
	require.Equal(t, task.ErrWorkerReset, evs[0].Error.Code)
	require.Same(t, s2, h.Peek("t"))
}

// Streams that never got an event go away after Keep, as finished ones do;
// Wait sees a stream that appears and creates none.
func TestHubGCAndWait(t *testing.T) {
	h := Hub{Keep: 20 * time.Millisecond}
	h.Stream("never")
	h.Stream("done").Finish(task.Event{Type: "end"})
	live := h.Stream("live")
	_, _ = live.Push([]task.Event{tok(0)})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	require.Nil(t, h.Wait(ctx, "absent"))
	cancel()
	require.Nil(t, h.Peek("absent"), "Wait creates nothing")
	deadline := time.Now().Add(10 * time.Second)
	for h.Peek("never") != nil || h.Peek("done") != nil {
		require.True(t, time.Now().Before(deadline), "old streams kept")
		time.Sleep(5 * time.Millisecond)
		h.Stream("other") // gc runs on the hub's path
	}
	require.NotNil(t, h.Peek("live"), "a stream with events that has not ended stays")

	got := make(chan *Stream)
	go func() { got <- h.Wait(context.Background(), "late") }()
	s := h.Open("late", 0)
	select {
	case w := <-got:
		require.Same(t, s, w)
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not see the stream appear")
	}
}
