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
	defer live.Attach()()
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
	require.NotNil(t, h.Peek("live"), "a stream with a reader that has not ended stays")

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

// A task that failed while no reader was attached leaves a stream with
// events and no final one: it goes away Keep after its last activity, and
// a holder of it (the generation, a stray reader) sees it end. A stream
// with a reader attached stays however quiet.
func TestHubDropsAbandonedStreams(t *testing.T) {
	h := Hub{Keep: 20 * time.Millisecond}
	abandoned := h.Stream("failed-unread")
	_, _ = abandoned.Push([]task.Event{{Type: "started", NodeID: "n"}, tok(0), tok(1)})
	read := h.Stream("read")
	_, _ = read.Push([]task.Event{tok(0)})
	detach := read.Attach()
	deadline := time.Now().Add(10 * time.Second)
	for h.Peek("failed-unread") != nil {
		require.True(t, time.Now().Before(deadline), "a stream with events, no final event and no reader is kept forever")
		time.Sleep(5 * time.Millisecond)
		h.Stream("other") // gc runs on the hub's path
	}
	require.True(t, abandoned.Ended(), "a dropped stream ends for whoever holds it")
	evs, _, _ := abandoned.Read(Cursor{Started: true, Next: 2})
	require.Equal(t, CodeStreamExpired, evs[0].Error.Code)
	require.NotNil(t, h.Peek("read"), "a stream with a reader stays")
	detach()
	for h.Peek("read") != nil {
		require.True(t, time.Now().Before(deadline), "a stream whose reader left is kept forever")
		time.Sleep(5 * time.Millisecond)
		h.Stream("other")
	}
}

// A stream ends with STREAM_LIMIT at its token bound instead of growing;
// past the stream bound the hub sheds finished streams first, then
// refuses a new one with an ended stream; the counts add up.
func TestHubBounds(t *testing.T) {
	h := Hub{MaxTokens: 5, MaxStreams: 2}
	s := h.Stream("long")
	for i := range 8 {
		_, _ = s.Push([]task.Event{tok(i)})
	}
	require.True(t, s.Ended())
	evs, _, _ := s.Read(Cursor{Started: true})
	require.Len(t, evs, 6, "5 tokens then the error")
	require.Equal(t, CodeStreamLimit, evs[5].Error.Code)
	require.Contains(t, evs[5].Error.Message, "long")
	streams, events, bytes := h.Held()
	require.Equal(t, 1, streams)
	require.EqualValues(t, 6, events)
	require.Positive(t, bytes)

	_, _ = h.Stream("live").Push([]task.Event{tok(0)})
	third := h.Stream("third") // "long" has ended: shed for it
	require.False(t, third.Ended())
	require.Nil(t, h.Peek("long"))
	refused := h.Stream("fourth")
	require.True(t, refused.Ended(), "no room: the stream ends at once")
	evs, _, _ = refused.Read(Cursor{})
	require.Equal(t, CodeStreamLimit, evs[0].Error.Code)
	require.Equal(t, 2, h.Len())
	streams, events, _ = h.Held()
	require.Equal(t, 2, streams)
	require.EqualValues(t, 1, events, "a shed stream's events are no longer counted")

	// The byte bound over all streams: a push past it ends that stream.
	small := Hub{MaxBytes: 4 << 10}
	a := small.Stream("a")
	for i := 0; !a.Ended(); i++ {
		require.Less(t, i, 10000, "the total byte bound never ended the stream")
		_, _ = a.Push([]task.Event{{Type: "token", I: i, T: "0123456789abcdef"}})
	}
	evs, _, _ = a.Read(Cursor{Started: true, Next: a.Tokens()})
	require.Equal(t, CodeStreamLimit, evs[0].Error.Code)
	require.Contains(t, evs[0].Error.Message, "bytes of streams")
	_, _, b := small.Held()
	require.LessOrEqual(t, b, int64(4<<10)+eventCost(evs[0]), "past the bound by the final event at most")
}

// A pusher whose sink never answers stops when Close's wait passes: no
// goroutine keeps retrying it; and while open it gives up after pushGiveUp
// without a success.
func TestPusherStopsAfterClose(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	p := NewPusher(task.Sink{URL: srv.URL}, "t", nil)
	p.Send(tok(0))
	require.Error(t, p.Close(30*time.Millisecond))
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("a closed pusher goes on retrying")
	}

	old := pushGiveUp
	pushGiveUp = 50 * time.Millisecond
	defer func() { pushGiveUp = old }()
	p = NewPusher(task.Sink{URL: srv.URL}, "t2", nil)
	p.Send(tok(0))
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("an open pusher retries a dead sink forever")
	}
	n := hits.Load()
	p.Send(tok(1))
	require.Error(t, p.Close(time.Second))
	require.Equal(t, n, hits.Load(), "nothing sent after giving up")
}

// Done closes at the final event, however it came (a push, Finish, a
// bound), also for one asked after it; a reader's channel closes on each
// event taken, with none allocated for a push nobody waits on.
func TestStreamDone(t *testing.T) {
	closed := func(c <-chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}
	h := &Hub{}
	s := h.Stream("t1")
	done := s.Done()
	_, _ = s.Push([]task.Event{{Type: "token", I: 0, T: "a"}})
	require.False(t, closed(done))
	_, cur, changed := s.Read(Cursor{})
	require.False(t, closed(changed))
	_, _ = s.Push([]task.Event{{Type: "token", I: 1, T: "b"}, {Type: "token", I: 2, T: "c"}})
	require.True(t, closed(changed), "a push wakes the reader")
	require.False(t, closed(done))
	_, _ = s.Push([]task.Event{{Type: "end"}})
	require.True(t, closed(done))
	require.True(t, closed(s.Done()))
	evs, _, _ := s.Read(cur)
	require.Len(t, evs, 3)

	s = h.Stream("t2")
	done = s.Done()
	s.Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrCanceled}})
	require.True(t, closed(done))

	s = (&Hub{MaxTokens: 1}).Stream("t3")
	done = s.Done()
	_, _ = s.Push([]task.Event{{Type: "token", I: 0}, {Type: "token", I: 1}})
	require.True(t, closed(done), "a stream ended at a bound is done")
}
