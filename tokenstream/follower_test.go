package tokenstream_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// nodeLink is a node's hub served by a real link server.
func nodeLink(t *testing.T, nodeID string) (*tokenstream.Hub, string) {
	hub := &tokenstream.Hub{}
	srv := link.NewServer(link.NewSource(nodeID), link.Options{Token: "link-secret", Streams: hub})
	require.NoError(t, srv.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	return hub, link.URL("", srv.Addr())
}

func tokEv(i int) task.Event {
	return task.Event{Type: "token", I: i, T: fmt.Sprint(i, " "), Tok: int32(i)}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		require.True(t, time.Now().Before(deadline), what)
		time.Sleep(2 * time.Millisecond)
	}
}

// A replica follows a task on its node's link; the node is lost and the
// task moves to another node, whose stream holds the resumed tokens: the
// replica's stream has every token once, in order, then the end. The
// same with events handed over one by one and in batches.
func TestFollowerFollowsAMove(t *testing.T) {
	t.Run("each", func(t *testing.T) { followAMove(t, false) })
	t.Run("batches", func(t *testing.T) { followAMove(t, true) })
}

func followAMove(t *testing.T, batches bool) {
	hub1, url1 := nodeLink(t, "n1")
	hub2, url2 := nodeLink(t, "n2")
	var mu sync.Mutex
	status := task.Status{State: task.Queued}
	setStatus := func(s task.Status) { mu.Lock(); status = s; mu.Unlock() }
	var ended atomic.Int32
	local := &tokenstream.Hub{}
	f := &tokenstream.Follower{Hub: local, Poll: 5 * time.Millisecond,
		Status: func(context.Context, string) (task.Status, bool, error) {
			mu.Lock()
			defer mu.Unlock()
			return status, true, nil
		},
		LinkURL: func(_ context.Context, nodeID string) (string, error) {
			return map[string]string{"n1": url1, "n2": url2}[nodeID], nil
		},
		Subscribe: func(ctx context.Context, url, taskID string, after int, each func(task.Event) error) error {
			return (&link.Client{URL: url, Token: "link-secret"}).Events(ctx, taskID, after, each)
		},
		Ended: func(string) { ended.Add(1) }}
	if batches {
		f.Subscribe = nil
		f.SubscribeBatch = func(ctx context.Context, url, taskID string, after int, each func([]task.Event) error) error {
			return (&link.Client{URL: url, Token: "link-secret"}).EventBatches(ctx, taskID, after, each)
		}
	}
	defer f.Close()
	st, release := f.Read("t-move")
	defer release()
	require.Equal(t, 1, f.Running())

	// Queued, then running on n1.
	w1 := task.Where{NodeID: "n1", PoolID: "p1"}
	setStatus(task.Status{State: task.Running, Where: &w1})
	s1 := hub1.Open("t-move", 0)
	_, _ = s1.Push([]task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"}, tokEv(0), tokEv(1), tokEv(2)})
	waitFor(t, "tokens from n1", func() bool { return st.Tokens() == 3 })
	// n1's engine breaks off: the workflow moves the task to n2 from token 3.
	s1.Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrWorkerReset, Retriable: true}})
	time.Sleep(20 * time.Millisecond) // the follower reads the status (still on n1) a few times
	require.False(t, st.Ended(), "a node's WORKER_RESET is not the task's outcome")
	w2 := task.Where{NodeID: "n2", PoolID: "p2"}
	setStatus(task.Status{State: task.Running, Where: &w2, Migrations: []task.Migration{{From: w1, To: w2, AtToken: 3}}})
	s2 := hub2.Open("t-move", 0)
	_, _ = s2.Push([]task.Event{{Type: "started", NodeID: "n2", PoolID: "p2"}, tokEv(0), tokEv(1), tokEv(2), tokEv(3)})
	waitFor(t, "tokens from n2", func() bool { return st.Tokens() == 4 })
	_, _ = s2.Push([]task.Event{tokEv(4), {Type: "end", TokensOut: 5}})
	waitFor(t, "end", st.Ended)

	evs, _, _ := st.Read(tokenstream.Cursor{})
	var idx []int
	for _, ev := range evs {
		if ev.Type == "token" {
			idx = append(idx, ev.I)
		}
	}
	require.Equal(t, []int{0, 1, 2, 3, 4}, idx)
	require.Equal(t, "end", evs[len(evs)-1].Type)
	require.Equal(t, "p1", evs[0].PoolID, "the first started event stays")
	require.EqualValues(t, 1, ended.Load())
	waitFor(t, "follower gone after the end", func() bool { return f.Running() == 0 })
}

// A task that ended is finished from its record; a follower with no reader
// stops after Idle, leaving nothing running.
func TestFollowerFinishesFromStatusAndStopsIdle(t *testing.T) {
	local := &tokenstream.Hub{}
	var subscribed atomic.Int32
	f := &tokenstream.Follower{Hub: local, Poll: 5 * time.Millisecond, Idle: 30 * time.Millisecond,
		Status: func(_ context.Context, id string) (task.Status, bool, error) {
			if id == "t-done" {
				return task.Status{State: task.Completed, Pieces: []string{"a", "b"}, TokensOut: 2}, false, nil
			}
			return task.Status{State: task.Queued}, true, nil
		},
		LinkURL: func(context.Context, string) (string, error) { return "", fmt.Errorf("unused") },
		Subscribe: func(context.Context, string, string, int, func(task.Event) error) error {
			subscribed.Add(1)
			return nil
		}}
	defer f.Close()
	st, release := f.Read("t-done")
	waitFor(t, "finished from the record", st.Ended)
	release()
	evs, _, _ := st.Read(tokenstream.Cursor{})
	require.Len(t, evs, 3)
	require.Equal(t, "b", evs[1].T)

	f.Start("t-queued", nil)
	waitFor(t, "idle follower stopped", func() bool { return f.Running() == 0 })
	require.False(t, local.Stream("t-queued").Ended(), "stopping a follower does not end the stream")
	require.Zero(t, subscribed.Load())
}

// dropped waits until hub has dropped the stream of probe (no event, no
// reader, past Keep), calling Stream to run its gc.
func dropped(t *testing.T, hub *tokenstream.Hub, id string) {
	waitFor(t, "stream "+id+" dropped", func() bool {
		hub.Stream("gc-trigger")
		return hub.Peek(id) == nil
	})
}

// A replica's stream with a reader attached through the Follower stays
// however quiet; once its reader left and the follower stopped idle (a
// task that failed with nobody reading), the hub drops it.
func TestFollowerReaderKeepsTheStream(t *testing.T) {
	local := &tokenstream.Hub{Keep: 30 * time.Millisecond}
	f := &tokenstream.Follower{Hub: local, Poll: 5 * time.Millisecond, Idle: 10 * time.Millisecond,
		Status: func(context.Context, string) (task.Status, bool, error) {
			return task.Status{State: task.Queued}, true, nil
		},
		LinkURL:   func(context.Context, string) (string, error) { return "", fmt.Errorf("unused") },
		Subscribe: func(context.Context, string, string, int, func(task.Event) error) error { return nil }}
	defer f.Close()
	st, release := f.Read("t-read")
	_, _ = st.Push([]task.Event{{Type: "started"}, tokEv(0)})
	_, _ = local.Stream("probe").Push([]task.Event{tokEv(0)}) // created after t-read's last event
	dropped(t, local, "probe")
	require.Same(t, st, local.Peek("t-read"), "a stream with a reader is kept")
	release()
	dropped(t, local, "t-read")
	require.True(t, st.Ended())
	waitFor(t, "follower stopped", func() bool { return f.Running() == 0 })
}

// The node link's subscriber keeps the node's stream; when the subscriber
// goes away its handler ends (the stream is dropped after Keep, which it
// is not while a handler is attached).
func TestLinkSubscriberKeepsTheNodeStream(t *testing.T) {
	hub := &tokenstream.Hub{Keep: 30 * time.Millisecond}
	srv := link.NewServer(link.NewSource("n1"), link.Options{Token: "link-secret", Streams: hub})
	require.NoError(t, srv.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	st := hub.Open("t-sub", 0)
	_, _ = st.Push([]task.Event{{Type: "started"}, tokEv(0)})
	ctx, cancel := context.WithCancel(context.Background())
	var got atomic.Int32
	done := make(chan error, 1)
	go func() {
		done <- (&link.Client{URL: link.URL("", srv.Addr()), Token: "link-secret"}).Events(ctx, "t-sub", -1,
			func(task.Event) error { got.Add(1); return nil })
	}()
	waitFor(t, "subscribed", func() bool { return got.Load() == 2 })
	_, _ = hub.Stream("probe").Push([]task.Event{tokEv(0)})
	dropped(t, hub, "probe")
	require.Same(t, st, hub.Peek("t-sub"), "a stream with a subscriber is kept")
	cancel()
	<-done
	dropped(t, hub, "t-sub")
}

// Every follower ends with its owner: Close stops those with readers
// attached too, and a Read after Close starts none.
func TestFollowerCloseStopsAll(t *testing.T) {
	f := &tokenstream.Follower{Hub: &tokenstream.Hub{}, Poll: 5 * time.Millisecond,
		Status: func(ctx context.Context, _ string) (task.Status, bool, error) {
			<-ctx.Done() // a status read that hangs until its owner ends
			return task.Status{}, false, ctx.Err()
		},
		LinkURL:   func(context.Context, string) (string, error) { return "", fmt.Errorf("unused") },
		Subscribe: func(context.Context, string, string, int, func(task.Event) error) error { return nil }}
	_, r1 := f.Read("a")
	defer r1()
	_, r2 := f.Read("b")
	defer r2()
	require.Equal(t, 2, f.Running())
	f.Close()
	waitFor(t, "followers stopped on Close", func() bool { return f.Running() == 0 })
	_, r3 := f.Read("c")
	defer r3()
	require.Zero(t, f.Running())
}

// A batch is taken as its events one by one were: metrics seen on an
// earlier subscription are skipped, tokens held are skipped, and a gap
// breaks the subscription with what the batch held before it taken.
func TestFollowerBatch(t *testing.T) {
	local := &tokenstream.Hub{}
	var mu sync.Mutex
	var calls int
	var ended atomic.Int32
	w := task.Where{NodeID: "n1", PoolID: "p1"}
	f := &tokenstream.Follower{Hub: local, Poll: 5 * time.Millisecond,
		Status: func(context.Context, string) (task.Status, bool, error) {
			return task.Status{State: task.Running, Where: &w}, true, nil
		},
		LinkURL: func(context.Context, string) (string, error) { return "http://n1", nil },
		SubscribeBatch: func(ctx context.Context, _, _ string, after int, each func([]task.Event) error) error {
			mu.Lock()
			calls++
			n := calls
			mu.Unlock()
			metrics := task.Event{Type: "metrics", Metrics: map[string]any{"waiting": true}}
			switch n {
			case 1: // the connection breaks after two tokens
				if err := each([]task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"}, metrics, tokEv(0), tokEv(1)}); err != nil {
					return err
				}
				return link.ErrStreamCut
			case 2: // a gap: token 3 without 2
				if after != 1 {
					return fmt.Errorf("after %d, want 1", after)
				}
				err := each([]task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"}, metrics, tokEv(1), tokEv(3)})
				if err == nil {
					return fmt.Errorf("a gap was taken")
				}
				return err
			default:
				if err := each([]task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"}, metrics, tokEv(2)}); err != nil {
					return err
				}
				return each([]task.Event{tokEv(3), {Type: "end", TokensOut: 4}})
			}
		},
		Ended: func(string) { ended.Add(1) }}
	defer f.Close()
	st, release := f.Read("t-batch")
	defer release()
	waitFor(t, "end", st.Ended)
	evs, _, _ := st.Read(tokenstream.Cursor{})
	var types []string
	for _, ev := range evs {
		types = append(types, ev.Type)
		if ev.Type == "token" {
			types[len(types)-1] += fmt.Sprint(ev.I)
		}
	}
	// The same generation (n1/p1) each time: its metrics are taken once.
	require.Equal(t, []string{"started", "metrics", "token0", "token1", "token2", "token3", "end"}, types)
	require.EqualValues(t, 1, ended.Load())
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, 3, calls, "a cut, a gap, then the rest")
}
