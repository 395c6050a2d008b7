package scheduler_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
)

// cluster is one node's slot authority with two engines, and three
// schedulers (as three apiserver replicas would run) placing on it from
// the view its link would give them.
type cluster struct {
	node  *activities.Generations
	slots map[string]int
	reps  []*scheduler.Scheduler
}

var engines = []activities.EngineSlots{{PoolID: "p1", URL: "http://e1", Epoch: 1, Slots: 2}, {PoolID: "p2", URL: "http://e2", Epoch: 1, Slots: 1}}

func newCluster(t *testing.T) *cluster {
	c := &cluster{node: &activities.Generations{NodeID: "n1"}, slots: map[string]int{}}
	c.node.SetEngines(engines)
	view := func(context.Context) ([]placement.Candidate, error) {
		var out []placement.Candidate
		for _, e := range engines {
			st := c.node.Stats(e.PoolID, e.URL)
			out = append(out, placement.Candidate{PoolID: e.PoolID, NodeID: "n1", ModelID: "m", URL: e.URL, Epoch: e.Epoch,
				State: pool.Ready, NodeOnline: true, SlotsTotal: e.Slots, SlotsBusy: st.Running, Queued: st.Queued,
				QueuedInteractive: st.QueuedInteractive, ServiceMs: st.ServiceMs, Claims: st.Claims})
		}
		return out, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for range 3 {
		s := &scheduler.Scheduler{Source: view, Refresh: 5 * time.Millisecond, Capacity: 4096}
		go s.Run(ctx)
		c.reps = append(c.reps, s)
	}
	for _, e := range engines {
		c.slots[e.PoolID] = e.Slots
	}
	return c
}

// place has replica i place a task, and claims its slot at the node;
// placed, when set, is told the pool before the claim.
func (c *cluster) place(ctx context.Context, i int, id string, prio task.Priority, at time.Time, placed func(task.Where)) (task.Where, func(), error) {
	s := c.reps[i%len(c.reps)]
	where, err := s.Wait(ctx, id, prio, placement.Request{ModelID: "m"}, at)
	if err != nil {
		return where, nil, err
	}
	if placed != nil {
		placed(where)
	}
	rel, _, err := c.node.Claim(ctx, activities.ClaimRequest{PoolID: where.PoolID, URL: where.URL, Epoch: where.Epoch,
		TaskID: id, Priority: prio, EnqueuedAt: at})
	if err != nil {
		return where, nil, err
	}
	return where, func() { rel(); s.Release(id, where.PoolID, time.Millisecond) }, nil
}

func prio(i int) task.Priority {
	if i%3 == 0 {
		return task.Interactive
	}
	return task.Batch
}

// Three replicas dispatching 200 concurrent tasks to the same pools never
// run more generations on a pool than its slots, and spread them over
// both pools.
func TestReplicasNeverOverCommit(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	t0 := time.Now()
	var mu sync.Mutex
	perPool := map[string]int{}
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprint("t", i)
			where, done, err := c.place(ctx, i, id, prio(i), t0.Add(time.Duration(i)*time.Millisecond), nil)
			if err != nil {
				t.Error(id, err)
				return
			}
			running := c.node.Running(where.PoolID, where.URL)
			mu.Lock()
			perPool[where.PoolID]++
			mu.Unlock()
			if running > c.slots[where.PoolID] {
				t.Errorf("%s: %d generations on %s, %d slots", id, running, where.PoolID, c.slots[where.PoolID])
			}
			time.Sleep(time.Millisecond) // the generation
			done()
		}()
	}
	wg.Wait()
	require.Equal(t, 200, perPool["p1"]+perPool["p2"])
	require.Positive(t, perPool["p1"])
	require.Positive(t, perPool["p2"])
	for _, e := range engines {
		require.Zero(t, c.node.Stats(e.PoolID, e.URL).Running)
	}
}

// With every slot held, tasks placed through three replicas wait at the
// node; once slots free, each pool starts them interactive first, then by
// enqueue time, whichever replica placed them: a task starts only when
// every task ahead of it on its pool has started (at most slots-1 of them
// may not have said so yet).
func TestReplicasFIFOPerPool(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	var holders []func()
	for _, e := range engines {
		for j := range e.Slots {
			rel, _, err := c.node.Claim(ctx, activities.ClaimRequest{PoolID: e.PoolID, URL: e.URL, TaskID: fmt.Sprint("hold", j)})
			require.NoError(t, err)
			holders = append(holders, rel)
		}
	}
	const n = 30
	t0 := time.Now()
	type start struct {
		id, pool string
		release  chan struct{}
	}
	started := make(chan start, n)
	placed := make(chan [2]string, n)
	for i := range n {
		go func() {
			id := fmt.Sprintf("t%02d", i)
			where, done, err := c.place(ctx, i, id, prio(i), t0.Add(time.Duration(i)*time.Millisecond),
				func(w task.Where) { placed <- [2]string{id, w.PoolID} })
			if err != nil {
				t.Error(id, err)
				return
			}
			rel := make(chan struct{})
			started <- start{id, where.PoolID, rel}
			<-rel
			done()
		}()
	}
	queued := func() int {
		q := 0
		for _, e := range engines {
			q += c.node.Stats(e.PoolID, e.URL).Queued
		}
		return q
	}
	deadline := time.After(30 * time.Second)
	for queued() < n {
		select {
		case <-c.node.Changed():
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("only %d of %d tasks queued at the node", queued(), n)
		}
	}
	// Each pool's order: interactive first, then enqueue time (= index).
	order := map[string][]string{}
	byID := map[string]int{}
	for range n {
		p := <-placed
		order[p[1]] = append(order[p[1]], p[0])
	}
	for i := range n {
		byID[fmt.Sprintf("t%02d", i)] = i
	}
	for _, ids := range order {
		slices.SortFunc(ids, func(a, b string) int {
			ia, ib := byID[a], byID[b]
			if (prio(ia) == task.Interactive) != (prio(ib) == task.Interactive) {
				if prio(ia) == task.Interactive {
					return -1
				}
				return 1
			}
			return ia - ib
		})
	}
	require.Len(t, order, 2, "both pools were joined: %v", order)
	for _, rel := range holders {
		rel()
	}
	seen := map[string]bool{}
	for range n {
		var s start
		select {
		case s = <-started:
		case <-time.After(30 * time.Second):
			t.Fatal("a queued task never started")
		}
		ahead := 0
		for _, id := range order[s.pool] {
			if id == s.id {
				break
			}
			if !seen[id] {
				ahead++
			}
		}
		require.Less(t, ahead, c.slots[s.pool], "%s started on %s with %d tasks ahead of it not started (order %v)", s.id, s.pool, ahead, order[s.pool])
		seen[s.id] = true
		close(s.release)
	}
}
