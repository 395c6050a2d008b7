// Package scheduler admits tasks and hands them pool slots. Admission is
// one call (Admit): a pool must be able to serve the task (one is started
// for it under AutoPools), its session must have a turn left, and its
// queue room, before its workflow is started. Then a bounded queue per
// priority (interactive before batch, FIFO within each), a cached snapshot
// of pools (from the LinkView, which follows the nodes) copied every Refresh, and slot grants
// counted here. It lives in the apiserver beside the control worker; the truth of
// which tasks exist is in Temporal (each task is a workflow), so a
// restarted apiserver rebuilds its queue as the tasks' Place activities are
// retried.
package scheduler

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/task"
)

// noPoolGrace is how long a queued task waits for a pool to (re)appear
// before it fails with no pool.
const noPoolGrace = 3 * time.Second

// ErrQueueFull rejects a task at admission (see QueueFullError).
var ErrQueueFull = errors.New("admission queue full")

// ErrDropped fails a queued task evicted by a newer one (policy drop-lru).
var ErrDropped = errors.New("dropped from a full queue for a newer task (policy drop-lru)")

// Admission policies when a priority's queue is full.
const (
	Reject  = "reject"   // refuse the new task (429)
	DropLRU = "drop-lru" // fail the longest-waiting task and take the new one
)

// Source lists the pools placement may use.
type Source func(ctx context.Context) ([]placement.Candidate, error)

// Scheduler is the admission queue and the slot ledger.
type Scheduler struct {
	Source Source
	// Fresh is the second look Admit takes when the snapshot cannot serve
	// a task (a pool just created may be missing); nil: Source.
	Fresh Source
	Tasks TaskStarter
	// AutoPools, when set, starts a pool for a task no pool serves (else
	// the task is refused).
	AutoPools *AutoPools
	Capacity  int           // per priority; 0 = 1024
	Policy    string        // Reject (default) or DropLRU
	Refresh   time.Duration // pool snapshot period; 0 = 500 ms
	Log       *slog.Logger
	Metrics   *Metrics

	// Sessions takes the turns of tasks with a session (required for them).
	Sessions Sessions

	pokeOnce sync.Once
	pokes    chan struct{} // Changed: refresh before the next tick

	mu      sync.Mutex
	cands   []placement.Candidate
	fresh   bool
	grants  map[string]int // pool id -> slots granted
	queues  map[task.Priority][]*ticket
	tickets map[string]*ticket
	dropped map[string]bool
	// announced are pools just created that a read may not show yet
	// (visibility lags): kept in the snapshot until a read has them.
	announced map[string]announcement
	// Observed service: EWMA of seconds a granted slot stays busy.
	service float64
}

type ticket struct {
	noPool   time.Time // since when no pool could serve it ("" while one could)
	granted  time.Time
	id       string
	req      placement.Request
	prio     task.Priority
	enqueued time.Time
	where    *placement.Candidate
	err      error
	done     chan struct{}
}

func (s *Scheduler) init() {
	if s.grants == nil {
		s.grants = map[string]int{}
		s.queues = map[task.Priority][]*ticket{}
		s.tickets = map[string]*ticket{}
		s.dropped = map[string]bool{}
		s.announced = map[string]announcement{}
	}
}

func (s *Scheduler) capacity() int {
	if s.Capacity <= 0 {
		return 1024
	}
	return s.Capacity
}

// Admission is what a newly admitted task is told.
type Admission struct {
	Position         int        // tasks ahead of it (0: placed at once)
	PredictedStartMs int64      // from the observed service time; -1: no observation yet
	Prepared         *pool.Spec // a pool started for the task (AutoPools)
}

// enqueue queues a task, or refuses it when its priority's queue is full.
// Tasks that can be placed at once are granted a slot here.
func (s *Scheduler) enqueue(id string, prio task.Priority, req placement.Request, at time.Time) (Admission, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil {
		return s.admission(t), nil
	}
	if len(s.queues[prio]) >= s.capacity() {
		if s.Policy != DropLRU || len(s.queues[prio]) == 0 {
			s.Metrics.rejected("queue_full")
			return Admission{}, ErrQueueFull
		}
		old := s.queues[prio][0]
		s.remove(old)
		old.err = ErrDropped
		s.dropped[old.id] = true
		close(old.done)
		s.Metrics.rejected("dropped")
	}
	t := &ticket{id: id, req: req, prio: prio, enqueued: at, done: make(chan struct{})}
	s.tickets[id] = t
	s.queues[prio] = insertFIFO(s.queues[prio], t)
	s.Metrics.enqueued(prio)
	s.dispatch()
	return s.admission(t), nil
}

// insertFIFO keeps a queue ordered by enqueue time (a ticket re-admitted
// after an apiserver restart goes back to its place).
func insertFIFO(q []*ticket, t *ticket) []*ticket {
	i := len(q)
	for i > 0 && q[i-1].enqueued.After(t.enqueued) {
		i--
	}
	q = append(q, nil)
	copy(q[i+1:], q[i:])
	q[i] = t
	return q
}

func (s *Scheduler) admission(t *ticket) Admission {
	if t.where != nil {
		return Admission{}
	}
	pos := 0
	if t.prio == task.Batch {
		pos += len(s.queues[task.Interactive])
	}
	for _, o := range s.queues[t.prio] {
		if o == t {
			break
		}
		pos++
	}
	slots := 0
	for _, c := range s.cands {
		if c.ModelID == t.req.ModelID {
			slots += c.SlotsTotal
		}
	}
	if s.service == 0 || slots == 0 {
		return Admission{Position: pos, PredictedStartMs: -1}
	}
	// Every slot of the model frees once per service time.
	waves := float64(pos/slots + 1)
	return Admission{Position: pos, PredictedStartMs: int64(waves * s.service * 1000)}
}

// Wait blocks until the task has a slot (or cannot get one: ErrNoPool).
// The task is admitted if it is not queued (after an apiserver restart);
// a re-admission never counts against the queue's bound.
func (s *Scheduler) Wait(ctx context.Context, id string, prio task.Priority, req placement.Request, at time.Time) (task.Where, error) {
	s.mu.Lock()
	s.init()
	if s.dropped[id] {
		s.mu.Unlock()
		return task.Where{}, ErrDropped
	}
	t := s.tickets[id]
	if t == nil || t.err != nil || (t.where == nil && !slices.Equal(t.req.Exclude, req.Exclude)) {
		if t != nil {
			s.remove(t)
		}
		t = &ticket{id: id, req: req, prio: prio, enqueued: at, done: make(chan struct{})}
		s.tickets[id] = t
		s.queues[prio] = insertFIFO(s.queues[prio], t)
		s.dispatch()
	}
	s.mu.Unlock()
	select {
	case <-t.done:
	case <-ctx.Done():
		s.mu.Lock()
		s.remove(t)
		s.mu.Unlock()
		return task.Where{}, ctx.Err()
	}
	if t.err != nil {
		return task.Where{}, t.err
	}
	return task.Where{NodeID: t.where.NodeID, PoolID: t.where.PoolID, URL: t.where.URL, Epoch: t.where.Epoch}, nil
}

// Granted is the slot a task already holds (admission placed it at once).
func (s *Scheduler) Granted(id string) (task.Where, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tickets[id]
	if t == nil || t.where == nil {
		return task.Where{}, false
	}
	return task.Where{NodeID: t.where.NodeID, PoolID: t.where.PoolID, URL: t.where.URL, Epoch: t.where.Epoch}, true
}

// Finished returns the slot of a task whose generation ended (its stream
// got end), without waiting for the workflow's Release: the next task
// need not wait for a workflow round trip.
func (s *Scheduler) Finished(id string) {
	s.mu.Lock()
	t := s.tickets[id]
	s.mu.Unlock()
	if t != nil && t.where != nil {
		s.Release(id, t.where.PoolID, time.Since(t.granted))
	}
}

// Release returns a task's slot; busy is how long it was held.
func (s *Scheduler) Release(id, poolID string, busy time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil && t.where != nil && t.where.PoolID == poolID {
		delete(s.tickets, id)
		if s.grants[poolID] > 0 {
			s.grants[poolID]--
		}
		if busy > 0 {
			sec := busy.Seconds()
			if s.service == 0 {
				s.service = sec
			} else {
				s.service = 0.8*s.service + 0.2*sec
			}
		}
	}
	s.dispatch()
}

// Forget drops a task that ended without a grant (canceled while queued).
func (s *Scheduler) Forget(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil && t.where == nil {
		s.remove(t)
	}
	delete(s.dropped, id)
}

// remove takes t out of its queue and the index. Called with s.mu held.
func (s *Scheduler) remove(t *ticket) {
	q := s.queues[t.prio]
	for i, o := range q {
		if o == t {
			s.queues[t.prio] = append(q[:i], q[i+1:]...)
			break
		}
	}
	if s.tickets[t.id] == t {
		delete(s.tickets, t.id)
	}
}

// dispatch grants slots to queued tasks: interactive first, FIFO within
// each priority; a task that must wait does not hold up those behind it
// that can run elsewhere. Called with s.mu held.
func (s *Scheduler) dispatch() {
	if !s.fresh {
		return // no snapshot yet: Run dispatches after the first refresh
	}
	for i := range s.cands {
		s.cands[i].SlotsBusy = s.grants[s.cands[i].PoolID]
	}
	for _, prio := range []task.Priority{task.Interactive, task.Batch} {
		q := s.queues[prio]
		kept := q[:0]
		for _, t := range q {
			c, err := placement.Choose(s.cands, t.req)
			switch {
			case err == nil:
				cc := *c
				t.where, t.granted = &cc, time.Now()
				s.grants[c.PoolID]++
				c.SlotsBusy++
				s.Metrics.placed("placed")
				s.Metrics.started(prio)
				close(t.done)
			case errors.Is(err, placement.ErrBusy):
				t.noPool = time.Time{}
				kept = append(kept, t)
			default:
				// A pool may be missing from one snapshot (a query that
				// failed, a pool being replaced): fail only after a grace.
				now := time.Now()
				if t.noPool.IsZero() {
					t.noPool = now
				}
				grace := noPoolGrace
				if t.req.NoPoolGrace > 0 {
					grace = t.req.NoPoolGrace
				}
				if now.Sub(t.noPool) < grace {
					kept = append(kept, t)
					continue
				}
				t.err = err
				delete(s.tickets, t.id)
				s.Metrics.placed("no_pool")
				close(t.done)
			}
		}
		for i := len(kept); i < len(q); i++ {
			q[i] = nil
		}
		s.queues[prio] = kept
		s.Metrics.depth(prio, len(kept))
	}
}

// Run refreshes the pool snapshot and dispatches until ctx ends.
func (s *Scheduler) Run(ctx context.Context) {
	period := s.Refresh
	if period <= 0 {
		period = 500 * time.Millisecond
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		s.refresh(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-s.poked():
		}
	}
}

// Changed says the Source has news (a node's link answered): Run takes a
// snapshot now rather than at its next tick. It never blocks.
func (s *Scheduler) Changed() {
	select {
	case s.poked() <- struct{}{}:
	default:
	}
}

func (s *Scheduler) poked() chan struct{} {
	s.pokeOnce.Do(func() { s.pokes = make(chan struct{}, 1) })
	return s.pokes
}

// refresh reads the pools once and dispatches.
func (s *Scheduler) refresh(ctx context.Context) { s.read(ctx, s.Source) }

// reread takes the fresh look of an admission.
func (s *Scheduler) reread(ctx context.Context) {
	if s.Fresh != nil {
		s.read(ctx, s.Fresh)
		return
	}
	s.refresh(ctx)
}

// read takes a snapshot from src and dispatches.
func (s *Scheduler) read(ctx context.Context, src Source) {
	cands, err := src(ctx)
	if err != nil {
		if s.Log != nil && ctx.Err() == nil && !errors.Is(err, ErrNoView) {
			s.Log.Warn("scheduler: cannot list pools", "err", err)
		}
		return
	}
	s.mu.Lock()
	s.init()
	seen := map[string]bool{}
	for _, c := range cands {
		seen[c.PoolID] = true
	}
	for id, a := range s.announced {
		switch {
		case seen[id] || time.Since(a.at) > announceTTL:
			delete(s.announced, id)
		default:
			cands = append(cands, a.c)
		}
	}
	s.cands, s.fresh = cands, true
	s.dispatch()
	s.mu.Unlock()
}

type announcement struct {
	c  placement.Candidate
	at time.Time
}

// announceTTL bounds how long an announced pool stands in for a read.
const announceTTL = 30 * time.Second

// announce adds a pool just created (state Starting) to the snapshot at
// once, so tasks for it wait instead of failing while reads lag.
func (s *Scheduler) announce(c placement.Candidate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	s.announced[c.PoolID] = announcement{c: c, at: time.Now()}
	for _, o := range s.cands {
		if o.PoolID == c.PoolID {
			return
		}
	}
	s.cands = append(s.cands, c)
	s.fresh = true
}

// servable says whether any pool (ready or coming up) could serve req.
func (s *Scheduler) servable(req placement.Request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.fresh {
		return nil // unknown yet: queue it
	}
	_, err := placement.Choose(s.cands, req)
	if errors.Is(err, placement.ErrBusy) {
		return nil
	}
	return err
}

// MaxContext is the largest per-slot context among the pools of a model
// (0: none known).
func (s *Scheduler) MaxContext(modelID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.cands {
		if c.ModelID == modelID {
			n = max(n, c.CtxPerSlot)
		}
	}
	return n
}

// PoolState is a pool as a waiting task's client sees it.
type PoolState struct {
	PoolID string     `json:"pool_id"`
	NodeID string     `json:"node_id"`
	State  pool.State `json:"state"`
}

// Waiting says where a queued task stands: its place in line and the pools
// of its model (a pool being started shows its progress here).
func (s *Scheduler) Waiting(id string) (position int, pools []PoolState, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tickets[id]
	if t == nil || t.where != nil {
		return 0, nil, false
	}
	for _, c := range s.cands {
		if c.ModelID == t.req.ModelID {
			pools = append(pools, PoolState{PoolID: c.PoolID, NodeID: c.NodeID, State: c.State})
		}
	}
	return s.admission(t).Position, pools, true
}

// backoff is how long a refused client should wait: one observed service
// time, or a second before any was observed.
func (s *Scheduler) backoff() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.service == 0 {
		return time.Second
	}
	return max(100*time.Millisecond, time.Duration(s.service*float64(time.Second)))
}
