// Package scheduler admits tasks and places them on pools. Admission is
// one call (Admit): a pool must be able to serve the task (one is started
// for it under AutoPools), its session must have a turn left, and its
// queue room, before its workflow is started. A task is dispatched at once
// to a Ready pool, busy or not, the one with the shortest expected wait in
// a cached snapshot of pools (from the LinkView, which follows the nodes)
// copied every Refresh: the node is the authority on its slots, and the
// task's generation waits in that pool's queue at the node (interactive
// first, then by enqueue time). What the scheduler holds of its own is
// what the nodes' links cannot show yet: its dispatches that have not
// reached the node (pending), and a local queue of tasks for which no pool
// is Ready yet (interactive before batch, FIFO within each). It lives in
// each apiserver replica beside the control worker; the truth of which
// tasks exist is in Temporal (each task is a workflow), so a restarted
// apiserver rebuilds its queue as the tasks' Place activities are retried.
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

// pendingTTL bounds how long a dispatch counts as pending (not shown by the
// node's link yet), and how long a dispatched task's ticket is kept for
// TryPlace: a claim reaches its node within a Temporal round trip.
const pendingTTL = 5 * time.Second

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

// Scheduler is admission, dispatch, and the local queue.
type Scheduler struct {
	Source Source
	// Fresh is the second look Admit takes when the snapshot cannot serve
	// a task (a pool just created may be missing); nil: Source.
	Fresh Source
	Tasks TaskStarter
	// AutoPools, when set, starts a pool for a task no pool serves (else
	// the task is refused).
	AutoPools *AutoPools
	Capacity  int           // per model and priority, at the nodes and here; 0 = 1024
	Policy    string        // Reject (default) or DropLRU
	Refresh   time.Duration // pool snapshot period; 0 = 500 ms
	Log       *slog.Logger
	Metrics   *Metrics

	// Sessions takes the turns of tasks with a session (required for them).
	Sessions Sessions
	// FastStart, when set, sends a task granted a Ready pool's slot at
	// admission to that node over its link while its workflow starts
	// (--fast-start); nil: the node starts it when the workflow's Generate
	// activity comes.
	FastStart FastStarter

	pokeOnce sync.Once
	pokes    chan struct{} // Changed: refresh before the next tick

	mu    sync.Mutex
	cands []placement.Candidate
	index map[string]int // pool id -> its place in cands
	fresh bool
	// pend is, per pool, the dispatches its node's link does not show yet.
	pend map[string]*pending
	// placed are the dispatched tickets, oldest first: each leaves after
	// pendingTTL.
	placed  []*ticket
	queues  map[task.Priority][]*ticket // the local queue: no Ready pool yet
	tickets map[string]*ticket
	dropped map[string]bool
	// announced are pools just created that a read may not show yet
	// (visibility lags): kept in the snapshot until a read has them.
	announced map[string]announcement
	// Observed service: EWMA of seconds a generation held its slot (for
	// the backoff of a refused client).
	service float64
}

// pending are a pool's dispatches its node has not shown yet. A dispatch
// shows when the engine's claims counter (on the link) moves past the
// value accounted: exact with one replica; with several, another's claim
// may be taken for one of ours (the node's count stays the authority).
type pending struct {
	url  string    // the engine dispatched to (another: the count restarted)
	acct uint64    // the claims counter accounted for
	q    []*ticket // oldest first
}

type ticket struct {
	noPool  time.Time // since when no pool could serve it ("" while one could)
	granted time.Time // dispatched at
	pending bool      // in pend: its node has not shown it yet
	// ahead and predicted: its place at the chosen pool when dispatched.
	ahead     int
	predicted int64
	id        string
	req       placement.Request
	prio      task.Priority
	enqueued  time.Time
	where     *placement.Candidate
	err       error
	done      chan struct{}
}

func (s *Scheduler) init() {
	if s.tickets == nil {
		s.pend = map[string]*pending{}
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
	// Position is the tasks ahead of it: at the pool it was dispatched to
	// (interactive: the interactive ones queued there; batch: all queued
	// there), or in the local queue while no pool is Ready.
	Position int
	// PredictedStartMs is when it should start: 0 with a free slot, else
	// waves of the pool's slots times the node's observed service time; -1
	// when unknown (none observed, no Ready pool).
	PredictedStartMs int64
	Prepared         *pool.Spec // a pool started for the task (AutoPools)
	// FastStart: the generation was sent to its slot's node ahead of the
	// workflow.
	FastStart bool
	durable   chan error // the workflow's start (AdmitAhead)
}

// Durable waits for the task's workflow start: nil once it is durable, the
// start's error if it failed (the ticket and the turn are given back, and
// a generation sent ahead is called off). After Admit it answers at once.
func (a Admission) Durable(ctx context.Context) error {
	if a.durable == nil {
		return nil
	}
	select {
	case err := <-a.durable:
		a.durable <- err // for another waiter
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// enqueue admits a task, or refuses it when its model's queue of its
// priority is full: the tasks of that model and priority waiting at the
// nodes (as the view shows them, with this scheduler's pending dispatches
// beyond the free slots) plus those in the local queue. A task with a
// Ready pool is dispatched here.
func (s *Scheduler) enqueue(id string, prio task.Priority, req placement.Request, at time.Time) (Admission, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil {
		return s.admission(t), nil
	}
	if s.queued(req.ModelID, prio) >= s.capacity() {
		var old *ticket // drop-lru: the longest-waiting of the local queue
		for _, o := range s.queues[prio] {
			if o.req.ModelID == req.ModelID {
				old = o
				break
			}
		}
		if s.Policy != DropLRU || old == nil {
			s.Metrics.rejected("queue_full")
			return Admission{}, ErrQueueFull
		}
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
		return Admission{Position: t.ahead, PredictedStartMs: t.predicted}
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
	return Admission{Position: pos, PredictedStartMs: -1}
}

// queued is the model's tasks of priority prio waiting: at the nodes (the
// view's, plus pending dispatches beyond a pool's free slots, which
// interactive ones take first) and in the local queue. Called with s.mu
// held.
func (s *Scheduler) queued(modelID string, prio task.Priority) int {
	n := 0
	for i := range s.cands {
		c := &s.cands[i]
		if c.ModelID != modelID {
			continue
		}
		pi, pb := s.pendingBy(c.PoolID)
		free := max(0, c.SlotsTotal-c.SlotsBusy)
		if prio == task.Interactive {
			n += c.QueuedInteractive + max(0, pi-free)
		} else {
			n += c.Queued - c.QueuedInteractive + max(0, pb-max(0, free-pi))
		}
	}
	for _, t := range s.queues[prio] {
		if t.req.ModelID == modelID {
			n++
		}
	}
	return n
}

// pendingBy counts a pool's pending dispatches by priority. Called with
// s.mu held.
func (s *Scheduler) pendingBy(poolID string) (interactive, batch int) {
	if len(s.pend) == 0 {
		return 0, 0
	}
	p := s.pend[poolID]
	if p == nil {
		return 0, 0
	}
	for _, t := range p.q {
		if t.prio == task.Interactive {
			interactive++
		} else {
			batch++
		}
	}
	return interactive, batch
}

// estimate is where a task of priority prio joining c stands: the tasks
// ahead of it and when it should start. Called with s.mu held, before the
// task is counted as pending there.
func (s *Scheduler) estimate(c *placement.Candidate, prio task.Priority) (ahead int, startMs int64) {
	pi, pb := s.pendingBy(c.PoolID)
	if c.SlotsBusy+c.Queued+pi+pb < c.SlotsTotal {
		return 0, 0 // a free slot
	}
	free := max(0, c.SlotsTotal-c.SlotsBusy)
	if prio == task.Interactive {
		ahead = c.QueuedInteractive + max(0, pi-free)
	} else {
		ahead = c.Queued + max(0, pi+pb-free)
	}
	if c.ServiceMs <= 0 {
		return ahead, -1
	}
	// Every slot of the pool frees once per service time.
	return ahead, int64(ahead/max(c.SlotsTotal, 1)+1) * c.ServiceMs
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
	// A dispatched ticket is dispatched again: the workflow asks because
	// its TryPlace missed, or its node refused the claim.
	if t == nil || t.err != nil || t.where != nil || !slices.Equal(t.req.Exclude, req.Exclude) {
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

// Granted is the pool a task was dispatched to at admission.
func (s *Scheduler) Granted(id string) (task.Where, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tickets[id]
	if t == nil || t.where == nil {
		return task.Where{}, false
	}
	return task.Where{NodeID: t.where.NodeID, PoolID: t.where.PoolID, URL: t.where.URL, Epoch: t.where.Epoch}, true
}

// Finished forgets a task whose generation ended (its stream got end),
// before the workflow's Release.
func (s *Scheduler) Finished(id string) {
	s.mu.Lock()
	t := s.tickets[id]
	s.mu.Unlock()
	if t != nil && t.where != nil {
		s.Release(id, t.where.PoolID, 0)
	}
}

// Release forgets a task's dispatch (its slot is the node's to free);
// busy is how long its generation held the slot (any replica may be told:
// the backoff follows it).
func (s *Scheduler) Release(id, poolID string, busy time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil && t.where != nil && t.where.PoolID == poolID {
		delete(s.tickets, id)
		s.unpend(t)
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

// drop forgets a task whose workflow did not start, its dispatch
// included.
func (s *Scheduler) drop(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if t := s.tickets[id]; t != nil {
		s.remove(t)
	}
	delete(s.dropped, id)
}

// remove takes t out of its queue (or its pending dispatch) and the index.
// Called with s.mu held.
func (s *Scheduler) remove(t *ticket) {
	s.unpend(t)
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

// unpend drops t's pending dispatch. Called with s.mu held.
func (s *Scheduler) unpend(t *ticket) {
	if !t.pending {
		return
	}
	t.pending = false
	p := s.pend[t.where.PoolID]
	if p == nil {
		return
	}
	if i := slices.Index(p.q, t); i >= 0 {
		p.q = slices.Delete(p.q, i, i+1)
	}
	s.pended(t.where.PoolID, p)
}

// pended sets a pool's pending count in the snapshot after p changed.
// Called with s.mu held.
func (s *Scheduler) pended(poolID string, p *pending) {
	if len(p.q) == 0 {
		delete(s.pend, poolID)
	}
	if i, ok := s.index[poolID]; ok {
		s.cands[i].Pending = len(p.q)
	}
}

// expire forgets dispatches older than pendingTTL. Called with s.mu held.
func (s *Scheduler) expire(now time.Time) {
	n := 0
	for n < len(s.placed) && now.Sub(s.placed[n].granted) > pendingTTL {
		t := s.placed[n]
		s.unpend(t)
		if s.tickets[t.id] == t {
			delete(s.tickets, t.id)
		}
		s.placed[n] = nil
		n++
	}
	s.placed = s.placed[n:]
}

// reconcile drops the pending dispatches a new snapshot shows: per pool,
// as many of the oldest as the engine's claims counter moved. Called with
// s.mu held, after the snapshot changed.
func (s *Scheduler) reconcile() {
	for id, p := range s.pend {
		i, ok := s.index[id]
		if !ok {
			continue // missing from this read: pendingTTL decides
		}
		c := &s.cands[i]
		switch {
		case c.URL != p.url:
			// Another engine: its count started again; the tasks meant for
			// the old one are refused there and placed again.
			for _, t := range p.q {
				t.pending = false
			}
			p.q = nil
		case c.Claims >= p.acct:
			n := int(min(c.Claims-p.acct, uint64(len(p.q))))
			for _, t := range p.q[:n] {
				t.pending = false
			}
			p.q = slices.Delete(p.q, 0, n)
		}
		p.acct = c.Claims
		s.pended(id, p)
	}
}

// dispatch places the local queue's tasks on Ready pools: interactive
// first, FIFO within each priority, each on the pool with the shortest
// expected wait, busy or not (its generation waits at the node); a task
// with no Ready pool stays. Called with s.mu held.
func (s *Scheduler) dispatch() {
	if !s.fresh {
		return // no snapshot yet: Run dispatches after the first refresh
	}
	now := time.Now()
	s.expire(now)
	for _, prio := range []task.Priority{task.Interactive, task.Batch} {
		q := s.queues[prio]
		kept := q[:0]
		for _, t := range q {
			r := t.req
			r.Queue = true
			c, err := placement.Choose(s.cands, r)
			switch {
			case err == nil:
				cc := *c
				t.where, t.granted = &cc, now
				t.ahead, t.predicted = s.estimate(c, prio)
				p := s.pend[c.PoolID]
				if p == nil {
					p = &pending{url: c.URL, acct: c.Claims}
					s.pend[c.PoolID] = p
				}
				p.q = append(p.q, t)
				t.pending = true
				s.pended(c.PoolID, p)
				s.placed = append(s.placed, t)
				if t.predicted == 0 {
					s.Metrics.placed("placed")
				} else {
					s.Metrics.placed("queued")
				}
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
	s.reindex()
	s.reconcile()
	s.dispatch()
	s.mu.Unlock()
}

// reindex maps pool ids to the snapshot. Called with s.mu held.
func (s *Scheduler) reindex() {
	s.index = make(map[string]int, len(s.cands))
	for i, c := range s.cands {
		s.index[c.PoolID] = i
	}
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
	if _, ok := s.index[c.PoolID]; ok {
		return
	}
	s.cands = append(s.cands, c)
	s.fresh = true
	s.reindex()
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

// Waiting says where a task of the local queue stands: its place in line
// and the pools of its model (a pool being started shows its progress
// here). Once dispatched, its node reports its place.
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
