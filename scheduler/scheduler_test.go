package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/task"
)

func oneSlot(ready bool) Source {
	state := pool.Ready
	if !ready {
		state = pool.Starting
	}
	return func(context.Context) ([]placement.Candidate, error) {
		return []placement.Candidate{{PoolID: "p", NodeID: "n", ModelID: "m", URL: "http://e", State: state, NodeOnline: true, SlotsTotal: 1}}, nil
	}
}

var req = placement.Request{ModelID: "m"}

// waitAsync runs Wait in the background and reports its outcome.
func waitAsync(s *Scheduler, id string, prio task.Priority, at time.Time) <-chan error {
	out := make(chan error, 1)
	go func() {
		_, err := s.Wait(context.Background(), id, prio, req, at)
		out <- err
	}()
	return out
}

// view is a Source whose pools a test changes, as their nodes' links would.
type view struct {
	mu    sync.Mutex
	cands []placement.Candidate
}

func (v *view) source(context.Context) ([]placement.Candidate, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]placement.Candidate(nil), v.cands...), nil
}

func (v *view) set(i int, f func(*placement.Candidate)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	f(&v.cands[i])
}

// Every task with a Ready pool is dispatched at once, busy or not; its
// position and predicted start are at that pool (interactive tasks count
// only the interactive ones ahead); the queue's bound counts the tasks
// waiting at the node, with this scheduler's dispatches it does not show
// yet beyond the free slots; the link's claims counter retires those.
func TestDispatchPositionAndCapacity(t *testing.T) {
	v := &view{cands: []placement.Candidate{{PoolID: "p", NodeID: "n", ModelID: "m", URL: "http://e", State: pool.Ready, NodeOnline: true, SlotsTotal: 1}}}
	s := &Scheduler{Source: v.source, Capacity: 2}
	s.refresh(context.Background())
	t0 := time.Now()
	a, err := s.enqueue("a", task.Interactive, req, t0)
	require.NoError(t, err)
	require.Equal(t, Admission{}, a, "a free slot: starts now")
	where, err := s.Wait(context.Background(), "a", task.Interactive, req, t0)
	require.NoError(t, err)
	require.Equal(t, "p", where.PoolID)
	require.Equal(t, 1, s.cands[0].Pending, "Wait on a dispatched ticket dispatches it again, once")

	b1, err := s.enqueue("batch-1", task.Batch, req, t0.Add(1))
	require.NoError(t, err)
	require.Equal(t, Admission{Position: 0, PredictedStartMs: -1}, b1, "next once a is done; no service time known")
	i1, err := s.enqueue("int-1", task.Interactive, req, t0.Add(2))
	require.NoError(t, err)
	require.Zero(t, i1.Position, "ahead of the batch task")
	i2, err := s.enqueue("int-2", task.Interactive, req, t0.Add(3))
	require.NoError(t, err)
	require.Equal(t, 1, i2.Position)
	_, err = s.enqueue("int-3", task.Interactive, req, t0.Add(4))
	require.ErrorIs(t, err, ErrQueueFull, "two interactive tasks wait for the pool (pending)")
	b2, err := s.enqueue("batch-2", task.Batch, req, t0.Add(5))
	require.NoError(t, err)
	require.Equal(t, 3, b2.Position, "behind both interactive tasks and the earlier batch one")
	g, ok := s.Granted("batch-2")
	require.True(t, ok, "dispatched though the pool is busy")
	require.Equal(t, "p", g.PoolID)
	require.Equal(t, 5, s.cands[0].Pending)

	// The node's link shows three of the five claims: three pending go.
	v.set(0, func(c *placement.Candidate) { c.SlotsBusy, c.Queued, c.QueuedInteractive, c.Claims = 1, 2, 1, 3 })
	s.refresh(context.Background())
	require.Equal(t, 2, s.cands[0].Pending)
	_, err = s.enqueue("int-3", task.Interactive, req, t0.Add(4))
	require.ErrorIs(t, err, ErrQueueFull, "one interactive shown at the node, one still pending")
	// All shown, some done; a service time observed: predictions follow it.
	v.set(0, func(c *placement.Candidate) { c.Queued, c.QueuedInteractive, c.Claims, c.ServiceMs = 2, 1, 5, 2000 })
	s.refresh(context.Background())
	require.Zero(t, s.cands[0].Pending)
	late, err := s.enqueue("late", task.Interactive, req, time.Now())
	require.NoError(t, err)
	require.Equal(t, Admission{Position: 1, PredictedStartMs: 4000}, late, "one ahead on one 2 s slot: two waves")
	lateB, err := s.enqueue("late-b", task.Batch, req, time.Now())
	require.NoError(t, err)
	require.Equal(t, 3, lateB.Position, "the node's two and the pending interactive one")

	// Released or older than pendingTTL, a dispatch is forgotten.
	s.Release("late", "p", 2*time.Second)
	require.Equal(t, 2*time.Second, s.backoff())
	s.mu.Lock()
	require.Equal(t, 1, s.cands[0].Pending)
	s.expire(time.Now().Add(pendingTTL + time.Second))
	require.Zero(t, s.cands[0].Pending)
	require.Empty(t, s.tickets)
	s.mu.Unlock()
}

// Pools are joined by the shortest expected wait: (busy + queued +
// pending) / slots, then free VRAM, then pool id.
func TestDispatchShortestQueue(t *testing.T) {
	v := &view{cands: []placement.Candidate{
		{PoolID: "p1", NodeID: "n1", ModelID: "m", URL: "http://1", State: pool.Ready, NodeOnline: true, SlotsTotal: 1},
		{PoolID: "p2", NodeID: "n2", ModelID: "m", URL: "http://2", State: pool.Ready, NodeOnline: true, SlotsTotal: 2, SlotsBusy: 2, Queued: 1},
	}}
	s := &Scheduler{Source: v.source}
	s.refresh(context.Background())
	var got []string
	for i := range 5 {
		_, err := s.enqueue(fmt.Sprint(i), task.Batch, req, time.Now())
		require.NoError(t, err)
		g, _ := s.Granted(fmt.Sprint(i))
		got = append(got, g.PoolID)
	}
	// Loads per slot: p1 0 < p2 1.5; p1 1 < 1.5; p1 2 > 1.5; p1 2 = p2 2
	// (pool id); p1 3 > p2 2.
	require.Equal(t, []string{"p1", "p1", "p2", "p1", "p2"}, got)
}

// drop-lru drops the longest-waiting task of the local queue (no Ready pool
// yet); tasks waiting at the nodes are not the replica's to drop.
func TestDropLRU(t *testing.T) {
	s := &Scheduler{Source: oneSlot(false), Capacity: 1, Policy: DropLRU}
	s.refresh(context.Background())
	t0 := time.Now()
	_, err := s.enqueue("old", task.Batch, req, t0)
	require.NoError(t, err)
	old := waitAsync(s, "old", task.Batch, t0)
	_, err = s.enqueue("new", task.Batch, req, t0.Add(2))
	require.NoError(t, err, "drop-lru takes the new task")
	select {
	case err := <-old:
		require.ErrorIs(t, err, ErrDropped)
	case <-time.After(10 * time.Second):
		t.Fatal("the longest-waiting task was not dropped")
	}
	_, err = s.Wait(context.Background(), "old", task.Batch, req, t0)
	require.ErrorIs(t, err, ErrDropped, "a dropped task stays dropped")

	s = &Scheduler{Source: oneSlot(true), Capacity: 1, Policy: DropLRU}
	s.refresh(context.Background())
	for _, id := range []string{"a", "b"} { // a runs, b waits at the node
		_, err = s.enqueue(id, task.Batch, req, t0)
		require.NoError(t, err)
	}
	_, err = s.enqueue("c", task.Batch, req, t0)
	require.ErrorIs(t, err, ErrQueueFull, "nothing local to drop")
}

func TestNoPoolAndCancel(t *testing.T) {
	s := &Scheduler{Source: func(context.Context) ([]placement.Candidate, error) { return nil, nil }, Refresh: 50 * time.Millisecond}
	s.refresh(context.Background())
	require.ErrorIs(t, s.servable(req), placement.ErrNoPool)
	rctx, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	go s.Run(rctx)
	began := time.Now()
	_, err := s.Wait(context.Background(), "x", task.Interactive, req, time.Now())
	require.ErrorIs(t, err, placement.ErrNoPool)
	require.GreaterOrEqual(t, time.Since(began), noPoolGrace, "a missing pool gets a grace to reappear")

	// A pool still starting: the task waits; its context ends the wait.
	s = &Scheduler{Source: oneSlot(false)}
	s.refresh(context.Background())
	require.NoError(t, s.servable(req))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = s.Wait(ctx, "y", task.Interactive, req, time.Now())
	require.True(t, errors.Is(err, context.DeadlineExceeded), err)
	s.mu.Lock()
	require.Empty(t, s.tickets, "a wait that ended leaves no ticket")
	s.mu.Unlock()
}

// A pool just created stands in the snapshot before reads show it.
func TestAnnouncedPool(t *testing.T) {
	reads := 0
	s := &Scheduler{Source: func(context.Context) ([]placement.Candidate, error) {
		reads++
		if reads < 3 {
			return nil, nil // visibility lags
		}
		return oneSlot(true)(context.Background())
	}}
	s.refresh(context.Background())
	require.ErrorIs(t, s.servable(req), placement.ErrNoPool)
	s.announce(placement.Candidate{PoolID: "p", NodeID: "n", ModelID: "m", State: pool.Starting, NodeOnline: true, SlotsTotal: 1})
	require.NoError(t, s.servable(req), "announced: the task may wait for it")
	s.refresh(context.Background()) // still not read: the announcement stays
	require.NoError(t, s.servable(req))
	s.refresh(context.Background()) // read now: Ready, placeable
	where, err := s.Wait(context.Background(), "a", task.Interactive, req, time.Now())
	require.NoError(t, err)
	require.Equal(t, "http://e", where.URL)
}
