package scheduler

import (
	"context"
	"errors"
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

func TestPriorityFIFOAndRelease(t *testing.T) {
	s := &Scheduler{Source: oneSlot(true), Capacity: 2}
	s.refresh(context.Background())
	t0 := time.Now()
	a, err := s.enqueue("a", task.Interactive, req, t0)
	require.NoError(t, err)
	require.Zero(t, a.Position)
	where, err := s.Wait(context.Background(), "a", task.Interactive, req, t0)
	require.NoError(t, err)
	require.Equal(t, "p", where.PoolID)

	_, err = s.enqueue("batch-1", task.Batch, req, t0.Add(1))
	require.NoError(t, err)
	i1, err := s.enqueue("int-1", task.Interactive, req, t0.Add(2))
	require.NoError(t, err)
	require.Zero(t, i1.Position)
	require.EqualValues(t, -1, i1.PredictedStartMs, "no service observed yet")
	i2, err := s.enqueue("int-2", task.Interactive, req, t0.Add(3))
	require.NoError(t, err)
	require.Equal(t, 1, i2.Position)
	_, err = s.enqueue("int-3", task.Interactive, req, t0.Add(4))
	require.ErrorIs(t, err, ErrQueueFull)
	b, err := s.enqueue("batch-2", task.Batch, req, t0.Add(5))
	require.NoError(t, err)
	require.Equal(t, 3, b.Position, "behind both interactive tasks and the earlier batch one")

	order := make(chan string, 4)
	for _, id := range []string{"batch-1", "int-1", "int-2", "batch-2"} {
		prio := task.Interactive
		if id[0] == 'b' {
			prio = task.Batch
		}
		go func() {
			if _, err := s.Wait(context.Background(), id, prio, req, t0); err == nil {
				order <- id
			}
		}()
	}
	// One slot: each release lets exactly the next one in.
	held := "a"
	for _, want := range []string{"int-1", "int-2", "batch-1", "batch-2"} {
		s.Release(held, "p", 2*time.Second)
		select {
		case got := <-order:
			require.Equal(t, want, got)
			held = got
		case <-time.After(10 * time.Second):
			t.Fatalf("%s never got the slot", want)
		}
	}
	// Service time is now observed: predictions follow it.
	p, err := s.enqueue("late", task.Interactive, req, time.Now())
	require.NoError(t, err)
	require.InDelta(t, 2000, p.PredictedStartMs, 1, "one wave of one 2 s slot")
	require.Equal(t, 2*time.Second, s.backoff())
}

func TestDropLRU(t *testing.T) {
	s := &Scheduler{Source: oneSlot(true), Capacity: 1, Policy: DropLRU}
	s.refresh(context.Background())
	t0 := time.Now()
	_, err := s.enqueue("a", task.Batch, req, t0) // takes the slot
	require.NoError(t, err)
	_, err = s.enqueue("old", task.Batch, req, t0.Add(1))
	require.NoError(t, err)
	old := waitAsync(s, "old", task.Batch, t0.Add(1))
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
