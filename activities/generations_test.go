package activities

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

// Without SetEngines (no link feeder) claims are only counted, per engine;
// changes coalesce into one pending signal, so a slow reader never blocks
// a generation.
func TestGenerationsUnmanaged(t *testing.T) {
	var g Generations
	var wg sync.WaitGroup
	ends := make(chan func(), 100)
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			url := "http://a"
			if i%4 == 0 {
				url = "http://b" // a reload's other engine
			}
			end, _, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: url, TaskID: fmt.Sprint(i)})
			require.NoError(t, err)
			ends <- end
		}()
	}
	wg.Wait()
	require.Equal(t, 75, g.Running("p", "http://a"))
	require.Equal(t, 25, g.Running("p", "http://b"))
	require.Zero(t, g.Running("q", "http://a"))
	<-g.Changed()
	select {
	case <-g.Changed():
		t.Fatal("100 changes left more than one pending signal")
	default:
	}
	close(ends)
	for end := range ends {
		end()
		end() // twice is once
	}
	require.Zero(t, g.Running("p", "http://a"))
	require.Empty(t, g.engines, "idle engines leave no entries")
	<-g.Changed()

	var none *Generations
	end, _, err := none.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "u"})
	require.NoError(t, err)
	end()
	require.Zero(t, none.Running("p", "u"))
}

// waitStats waits until the engine's figures satisfy ok.
func waitStats(t *testing.T, g *Generations, ok func(EngineStats) bool) EngineStats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := g.Stats("p", "http://a")
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine figures never matched: %+v", st)
		}
		select {
		case <-g.Changed():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Claims wait in order: interactive first, then by enqueue time, then task
// id; each is told its position as it moves up.
func TestGenerationsClaimOrder(t *testing.T) {
	g := &Generations{NodeID: "n1"}
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://a", Epoch: 1, Slots: 1}})
	hold, _, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "http://a", Epoch: 1, TaskID: "first"})
	require.NoError(t, err)

	t0 := time.Unix(1000, 0)
	type want struct {
		id   string
		prio task.Priority
		at   time.Time
	}
	// Submitted in an order unlike the one they must run in.
	claims := []want{
		{"b-late", task.Batch, t0.Add(3 * time.Second)},
		{"b-early", task.Batch, t0.Add(time.Second)},
		{"i-late", task.Interactive, t0.Add(5 * time.Second)},
		{"i-early-z", task.Interactive, t0.Add(2 * time.Second)},
		{"i-early-a", task.Interactive, t0.Add(2 * time.Second)},
	}
	var mu sync.Mutex
	var order []string
	positions := map[string][]int{}
	releases := make(chan func(), len(claims))
	var wg sync.WaitGroup
	for i, c := range claims {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, waited, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "http://a", TaskID: c.id, Priority: c.prio,
				EnqueuedAt: c.at, OnPosition: func(n int) {
					mu.Lock()
					positions[c.id] = append(positions[c.id], n)
					mu.Unlock()
				}})
			require.NoError(t, err)
			require.Positive(t, waited)
			mu.Lock()
			order = append(order, c.id)
			mu.Unlock()
			releases <- rel
		}()
		waitStats(t, g, func(st EngineStats) bool { return st.Queued == i+1 })
	}
	st := g.Stats("p", "http://a")
	require.Equal(t, EngineStats{Running: 1, Queued: 5, QueuedInteractive: 3, Claims: 6}, st)
	hold()
	for range claims {
		(<-releases)()
	}
	wg.Wait()
	require.Equal(t, []string{"i-early-a", "i-early-z", "i-late", "b-early", "b-late"}, order)
	mu.Lock()
	defer mu.Unlock()
	for _, c := range claims {
		require.NotEmpty(t, positions[c.id], "%s was told its place", c.id)
		for _, n := range positions[c.id] {
			require.True(t, n >= 0 && n < len(claims), "%s at %d", c.id, n)
		}
	}
	require.Positive(t, g.Stats("p", "http://a").ServiceMs, "the service time is observed")
}

// 200 concurrent claims on a 3-slot engine never run more than 3 at once,
// and every one runs.
func TestGenerationsNeverOverSlots(t *testing.T) {
	g := &Generations{}
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://a", Slots: 3}})
	var running, most, done atomic.Int64
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prio := task.Batch
			if i%3 == 0 {
				prio = task.Interactive
			}
			rel, _, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "http://a", TaskID: fmt.Sprint(i),
				Priority: prio, EnqueuedAt: time.Unix(int64(i), 0)})
			require.NoError(t, err)
			n := running.Add(1)
			for {
				m := most.Load()
				if n <= m || most.CompareAndSwap(m, n) {
					break
				}
			}
			require.LessOrEqual(t, g.Running("p", "http://a"), 3)
			running.Add(-1)
			rel()
			done.Add(1)
		}()
	}
	wg.Wait()
	require.EqualValues(t, 200, done.Load())
	require.LessOrEqual(t, most.Load(), int64(3))
	require.Zero(t, g.Running("p", "http://a"))
}

// A claim whose context ends leaves the queue (those behind move up); an
// unknown engine, another epoch, a full queue and an engine that goes
// away are refused with ErrSlotRefused.
func TestGenerationsCancelAndRefusals(t *testing.T) {
	g := &Generations{NodeID: "n1"}
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://a", Epoch: 2, Slots: 1}})
	hold, _, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "http://a", TaskID: "t0"})
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(context.Background())
	gone := make(chan error, 1)
	go func() {
		_, _, err := g.Claim(ctx, ClaimRequest{PoolID: "p", URL: "http://a", TaskID: "t1", EnqueuedAt: time.Unix(1, 0)})
		gone <- err
	}()
	waitStats(t, g, func(st EngineStats) bool { return st.Queued == 1 })
	pos := make(chan int, 8)
	second := make(chan error, 1)
	go func() {
		rel, _, err := g.Claim(context.Background(), ClaimRequest{PoolID: "p", URL: "http://a", TaskID: "t2", EnqueuedAt: time.Unix(2, 0),
			OnPosition: func(n int) { pos <- n }})
		if rel != nil {
			rel()
		}
		second <- err
	}()
	require.Equal(t, 1, <-pos)
	cancel()
	require.ErrorIs(t, <-gone, context.Canceled)
	require.Equal(t, 0, <-pos, "t2 moved up when t1 left")
	require.Equal(t, 1, g.Stats("p", "http://a").Queued)

	refused := func(r ClaimRequest) {
		t.Helper()
		_, _, err := g.Claim(context.Background(), r)
		require.ErrorIs(t, err, ErrSlotRefused)
	}
	refused(ClaimRequest{PoolID: "q", URL: "http://a", TaskID: "x"})
	refused(ClaimRequest{PoolID: "p", URL: "http://other", TaskID: "x"})
	refused(ClaimRequest{PoolID: "p", URL: "http://a", Epoch: 1, TaskID: "x"})

	// The queue's bound.
	e := g.engines[engineKey{"p", "http://a"}]
	g.mu.Lock()
	filler := e.waiting
	for len(e.waiting) < MaxQueuedPerEngine {
		e.waiting = append(e.waiting, &claim{pos: len(e.waiting), wake: make(chan struct{}, 1)})
	}
	g.mu.Unlock()
	refused(ClaimRequest{PoolID: "p", URL: "http://a", TaskID: "x"})
	g.mu.Lock()
	e.waiting = filler
	g.mu.Unlock()

	// The engine goes (a reload's handoff names another): t2 is refused,
	// t0 runs on.
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://b", Epoch: 3, Slots: 1}})
	require.True(t, errors.Is(<-second, ErrSlotRefused))
	require.Equal(t, 1, g.Running("p", "http://a"))
	hold()
	require.Zero(t, g.Running("p", "http://a"))
	g.mu.Lock()
	_, kept := g.engines[engineKey{"p", "http://a"}]
	g.mu.Unlock()
	require.False(t, kept, "a gone engine is forgotten once idle")
}

// The node hands out its engine's slots: a prompt goes to the idle slot
// whose cache holds the longest part of its chain (reuse), else the least
// recently used; the link's Prefixes are what the caches hold.
func TestGenerationsSlotCaches(t *testing.T) {
	g := &Generations{NodeID: "n1"}
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://a", Epoch: 1, Slots: 2}})
	require.Equal(t, -1, g.TakeSlot("p", "http://other", []uint64{1}, true), "an engine the node does not know: the engine picks")

	s0 := g.TakeSlot("p", "http://a", []uint64{1, 2}, true)
	s1 := g.TakeSlot("p", "http://a", []uint64{7}, true)
	require.ElementsMatch(t, []int{0, 1}, []int{s0, s1})
	require.Equal(t, -1, g.TakeSlot("p", "http://a", []uint64{1}, true), "both busy")
	require.Equal(t, []uint64{1, 2, 7}, g.Stats("p", "http://a").Prefixes, "a busy slot holds its prompt")
	g.PutSlot("p", "http://a", s0, []uint64{1, 2, 3})
	g.PutSlot("p", "http://a", s1, []uint64{7, 8})
	require.Equal(t, []uint64{1, 2, 3, 7, 8}, g.Stats("p", "http://a").Prefixes)

	// The next turn of the first prompt finds its slot, though it was not
	// the least recently used.
	require.Equal(t, s0, g.TakeSlot("p", "http://a", []uint64{1, 2, 3, 4}, true))
	g.PutSlot("p", "http://a", s0, nil) // it failed: its cache is unknown
	require.Equal(t, []uint64{7, 8}, g.Stats("p", "http://a").Prefixes)
	// Cold: the least recently used slot (s1), whatever it holds.
	require.Equal(t, s1, g.TakeSlot("p", "http://a", []uint64{7, 8, 9}, false))
	g.PutSlot("p", "http://a", s1, []uint64{7, 8, 9})

	// Another epoch of the engine: its caches start empty.
	g.SetEngines([]EngineSlots{{PoolID: "p", URL: "http://a", Epoch: 2, Slots: 2}})
	require.Empty(t, g.Stats("p", "http://a").Prefixes)
}
