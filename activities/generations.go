package activities

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/task"
)

// MaxQueuedPerEngine bounds the claims waiting for one engine's slots; a
// claim beyond it is refused (the task is placed again).
const MaxQueuedPerEngine = 4096

// Generations is the node's authority on its engines' slots (DESIGN.md
// decision 11; issue 11): a generation claims a slot before it talks to the
// engine, and waits in the engine's queue, interactive before batch, then
// by the task's enqueue time, while every slot is busy. An engine therefore
// never runs more generations than its slots, however many replicas placed
// tasks on it. The node link publishes the counts. Slots come from the
// node's own handoffs (SetEngines); until SetEngines is first called every
// claim is granted and only counted (a node without a link feeder). A nil
// Generations counts nothing and grants everything.
type Generations struct {
	NodeID  string
	Metrics *SlotMetrics // nil: none

	mu      sync.Mutex
	managed bool // SetEngines was called: unknown engines are refused
	engines map[engineKey]*engineSlots
	changed chan struct{}
}

// engineKey is one engine: its pool and the URL generations stream from
// (an epoch of a reload's old engine keeps its own count).
type engineKey struct{ pool, url string }

// engineSlots is one engine's slots and queue.
type engineSlots struct {
	epoch   int64
	slots   int  // 0: unknown (unmanaged)
	known   bool // named by the last SetEngines
	running int
	waiting []*claim // in order: priority, enqueue time, task id
	// interactive counts the interactive claims in waiting.
	interactive int
	// serviceMs: EWMA of how long a generation held a slot (0: none yet).
	serviceMs float64
	claims    uint64 // claims ever taken or queued on this engine
	// caches are the engine's slots as the node hands them out (managed
	// engines): which are in use and the prompt chain each one's cache
	// holds (package prefix).
	caches []slotCache
	uses   uint64
}

type slotCache struct {
	busy     bool
	chain    []uint64
	lastUsed uint64
}

// claim is one waiting generation.
type claim struct {
	ClaimRequest
	granted bool
	refused error
	pos     int           // its index in waiting
	wake    chan struct{} // 1-buffered: granted, refused or moved
}

// ClaimRequest is a generation asking for a slot of an engine.
type ClaimRequest struct {
	PoolID, URL string
	Epoch       int64 // 0: any
	TaskID      string
	Priority    task.Priority
	EnqueuedAt  time.Time
	// OnPosition, when set, is told the claim's place in the engine's
	// queue (0: next) whenever it changes while it waits; called on the
	// claiming goroutine.
	OnPosition func(position int)
}

// ErrSlotRefused: the node cannot take the claim (it does not know the
// engine, or the engine's queue is full); the task belongs elsewhere.
var ErrSlotRefused = errors.New("slot refused")

// EngineStats is one engine's slots as the node link publishes them.
type EngineStats struct {
	Running, Queued, QueuedInteractive int
	ServiceMs                          int64
	Claims                             uint64
	// Prefixes are the chain hashes the engine's slot caches hold, sorted.
	Prefixes []uint64
}

// EngineSlots names an engine the node runs and its slots.
type EngineSlots struct {
	PoolID, URL string
	Epoch       int64
	Slots       int
}

func (r *ClaimRequest) before(o *ClaimRequest) bool {
	if (r.Priority == task.Interactive) != (o.Priority == task.Interactive) {
		return r.Priority == task.Interactive
	}
	if !r.EnqueuedAt.Equal(o.EnqueuedAt) {
		return r.EnqueuedAt.Before(o.EnqueuedAt)
	}
	return r.TaskID < o.TaskID
}

// Claim takes a slot of the engine at r.URL for r's generation, waiting in
// the engine's queue while every slot is busy (or someone ahead waits).
// release returns the slot; waited is how long the claim queued. An
// engine the node does not run (no handoff, not Ready, another URL or
// epoch) or a full queue is refused at once with ErrSlotRefused; ctx's
// end leaves the queue with ctx's error.
func (g *Generations) Claim(ctx context.Context, r ClaimRequest) (release func(), waited time.Duration, err error) {
	if g == nil {
		return func() {}, 0, nil
	}
	k := engineKey{r.PoolID, r.URL}
	start := time.Now()
	g.mu.Lock()
	e := g.engines[k]
	switch {
	case !g.managed:
		if e == nil {
			e = g.engine(k)
		}
	case e == nil || !e.known:
		g.mu.Unlock()
		return nil, 0, g.refuse(r, "unknown_engine", fmt.Errorf("%w: node %s runs no ready engine of pool %s at %s", ErrSlotRefused, g.NodeID, r.PoolID, r.URL))
	case r.Epoch != 0 && e.epoch != 0 && r.Epoch != e.epoch:
		g.mu.Unlock()
		return nil, 0, g.refuse(r, "unknown_engine", fmt.Errorf("%w: node %s runs epoch %d of pool %s, not %d", ErrSlotRefused, g.NodeID, e.epoch, r.PoolID, r.Epoch))
	case len(e.waiting) >= MaxQueuedPerEngine:
		g.mu.Unlock()
		return nil, 0, g.refuse(r, "queue_full", fmt.Errorf("%w: node %s: %d generations already wait for pool %s", ErrSlotRefused, g.NodeID, len(e.waiting), r.PoolID))
	}
	e.claims++
	if len(e.waiting) == 0 && (!g.managed || e.running < e.slots) {
		e.running++
		g.changedLocked(k, e)
		g.mu.Unlock()
		g.Metrics.waited(g.NodeID, r.PoolID, 0)
		return g.releaser(k, time.Now()), 0, nil
	}
	c := &claim{ClaimRequest: r, wake: make(chan struct{}, 1)}
	i := sort.Search(len(e.waiting), func(i int) bool { return c.before(&e.waiting[i].ClaimRequest) })
	e.waiting = append(e.waiting, nil)
	copy(e.waiting[i+1:], e.waiting[i:])
	e.waiting[i] = c
	if r.Priority == task.Interactive {
		e.interactive++
	}
	g.renumber(e, i)
	g.grant(e)
	g.changedLocked(k, e)
	g.mu.Unlock()

	pos := -1
	for {
		g.mu.Lock()
		granted, refused, p := c.granted, c.refused, c.pos
		g.mu.Unlock()
		switch {
		case granted:
			waited = time.Since(start)
			g.Metrics.waited(g.NodeID, r.PoolID, waited)
			return g.releaser(k, time.Now()), waited, nil
		case refused != nil:
			return nil, time.Since(start), g.refuse(r, "engine_gone", refused)
		}
		if p != pos && r.OnPosition != nil {
			r.OnPosition(p)
		}
		pos = p
		select {
		case <-c.wake:
		case <-ctx.Done():
			g.mu.Lock()
			if c.granted { // granted meanwhile: hand the slot on
				e.running--
				g.grant(e)
			} else if c.refused == nil {
				e.waiting = append(e.waiting[:c.pos], e.waiting[c.pos+1:]...)
				if r.Priority == task.Interactive {
					e.interactive--
				}
				g.renumber(e, c.pos)
				g.grant(e)
			}
			g.changedLocked(k, e)
			g.mu.Unlock()
			return nil, time.Since(start), ctx.Err()
		}
	}
}

// releaser returns the slot taken at since once.
func (g *Generations) releaser(k engineKey, since time.Time) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			held := float64(time.Since(since).Microseconds()) / 1000
			g.mu.Lock()
			defer g.mu.Unlock()
			e := g.engines[k]
			e.running--
			if e.serviceMs == 0 {
				e.serviceMs = max(held, 0.001)
			} else {
				e.serviceMs = 0.8*e.serviceMs + 0.2*held
			}
			g.grant(e)
			g.changedLocked(k, e)
		})
	}
}

// grant hands free slots to the first waiting claims. Called with g.mu held.
func (g *Generations) grant(e *engineSlots) {
	n := 0
	for n < len(e.waiting) && (!g.managed || e.running < e.slots) {
		c := e.waiting[n]
		c.granted = true
		e.running++
		if c.Priority == task.Interactive {
			e.interactive--
		}
		wake(c.wake)
		n++
	}
	if n > 0 {
		e.waiting = append(e.waiting[:0], e.waiting[n:]...)
		g.renumber(e, 0)
	}
}

// renumber sets the positions from i on and wakes the claims that moved.
// Called with g.mu held.
func (g *Generations) renumber(e *engineSlots, from int) {
	for j := from; j < len(e.waiting); j++ {
		if c := e.waiting[j]; c.pos != j {
			c.pos = j
			wake(c.wake)
		}
	}
}

func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (g *Generations) refuse(r ClaimRequest, reason string, err error) error {
	g.Metrics.refused(g.NodeID, r.PoolID, reason)
	return err
}

// engine is k's record, made on first use. Called with g.mu held.
func (g *Generations) engine(k engineKey) *engineSlots {
	if g.engines == nil {
		g.engines = map[engineKey]*engineSlots{}
	}
	e := g.engines[k]
	if e == nil {
		e = &engineSlots{}
		g.engines[k] = e
	}
	return e
}

// SetEngines names the engines the node runs and their slots (its Ready
// handoffs); from the first call on, a claim on any other engine is
// refused. Claims waiting for an engine no longer named are refused (their
// tasks are placed again); generations running on it finish.
func (g *Generations) SetEngines(es []EngineSlots) {
	if g == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.managed = true
	named := make(map[engineKey]bool, len(es))
	for _, s := range es {
		k := engineKey{s.PoolID, s.URL}
		named[k] = true
		e := g.engine(k)
		if e.known && e.slots == s.Slots && e.epoch == s.Epoch {
			continue
		}
		if e.slots != s.Slots || e.epoch != s.Epoch {
			e.caches = make([]slotCache, s.Slots) // another engine: empty caches
		}
		e.known, e.slots, e.epoch = true, s.Slots, s.Epoch
		g.grant(e)
		g.changedLocked(k, e)
	}
	for k, e := range g.engines {
		if named[k] {
			continue
		}
		if e.known || len(e.waiting) > 0 {
			e.known = false
			for _, c := range e.waiting {
				c.refused = fmt.Errorf("%w: node %s no longer runs the engine of pool %s at %s", ErrSlotRefused, g.NodeID, k.pool, k.url)
				wake(c.wake)
			}
			e.waiting, e.interactive = nil, 0
			g.changedLocked(k, e)
		}
	}
}

// Stats is the pool's engine at url as the link publishes it.
func (g *Generations) Stats(poolID, url string) EngineStats {
	if g == nil {
		return EngineStats{}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	e := g.engines[engineKey{poolID, url}]
	if e == nil {
		return EngineStats{}
	}
	st := EngineStats{Running: e.running, Queued: len(e.waiting), QueuedInteractive: e.interactive,
		ServiceMs: int64(e.serviceMs + 0.5), Claims: e.claims}
	for _, c := range e.caches {
		st.Prefixes = append(st.Prefixes, c.chain...)
	}
	slices.Sort(st.Prefixes)
	st.Prefixes = slices.Compact(st.Prefixes)
	if e.serviceMs > 0 {
		st.ServiceMs = max(st.ServiceMs, 1) // known, if under a millisecond
	}
	return st
}

// Running is the number of generations on the pool's engine at url.
func (g *Generations) Running(poolID, url string) int { return g.Stats(poolID, url).Running }

// Changed receives after a count changed; changes between two receives
// coalesce into one. It has one reader: the node link's feeder. A nil
// Generations never changes.
func (g *Generations) Changed() <-chan struct{} {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.signal()
}

func (g *Generations) signal() chan struct{} {
	if g.changed == nil {
		g.changed = make(chan struct{}, 1)
	}
	return g.changed
}

// changedLocked signals the feeder, sets k's gauges, and forgets an idle
// engine the node no longer runs. Called with g.mu held.
func (g *Generations) changedLocked(k engineKey, e *engineSlots) {
	wake(g.signal())
	if !e.known && e.running == 0 && len(e.waiting) == 0 && g.engines[k] == e {
		delete(g.engines, k)
	}
	if g.Metrics == nil {
		return
	}
	running, queued := 0, [2]int{}
	for ok, o := range g.engines { // every engine of the pool (a reload runs two)
		if ok.pool != k.pool {
			continue
		}
		running += o.running
		queued[0] += o.interactive
		queued[1] += len(o.waiting) - o.interactive
	}
	g.Metrics.set(g.NodeID, k.pool, running, queued)
}

// SlotMetrics are the node's slot figures, per pool. No task ids as labels.
type SlotMetrics struct {
	Running *prometheus.GaugeVec
	Queued  *prometheus.GaugeVec
	Wait    *prometheus.HistogramVec
	Refused *prometheus.CounterVec
}

// NewSlotMetrics registers them on reg.
func NewSlotMetrics(reg prometheus.Registerer) *SlotMetrics {
	f := promauto.With(reg)
	return &SlotMetrics{
		Running: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_node_slots_running", Help: "Generations running on a pool's engines on this node.",
		}, []string{"node_id", "pool_id"}),
		Queued: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_node_slots_queued", Help: "Generations waiting at this node for a slot of a pool, by priority.",
		}, []string{"node_id", "pool_id", "priority"}),
		Wait: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_node_slot_wait_seconds", Help: "How long a generation waited at the node for a slot.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 18),
		}, []string{"node_id"}),
		Refused: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_slot_refusals_total", Help: "Slot claims the node refused, by reason (unknown_engine, queue_full, engine_gone).",
		}, []string{"node_id", "reason"}),
	}
}

func (m *SlotMetrics) set(nodeID, poolID string, running int, queued [2]int) {
	if m == nil {
		return
	}
	if running == 0 && queued == [2]int{} {
		m.Running.DeleteLabelValues(nodeID, poolID)
		m.Queued.DeleteLabelValues(nodeID, poolID, string(task.Interactive))
		m.Queued.DeleteLabelValues(nodeID, poolID, string(task.Batch))
		return
	}
	m.Running.WithLabelValues(nodeID, poolID).Set(float64(running))
	m.Queued.WithLabelValues(nodeID, poolID, string(task.Interactive)).Set(float64(queued[0]))
	m.Queued.WithLabelValues(nodeID, poolID, string(task.Batch)).Set(float64(queued[1]))
}

func (m *SlotMetrics) waited(nodeID, _ string, d time.Duration) {
	if m != nil {
		m.Wait.WithLabelValues(nodeID).Observe(d.Seconds())
	}
}

func (m *SlotMetrics) refused(nodeID, _, reason string) {
	if m != nil {
		m.Refused.WithLabelValues(nodeID, reason).Inc()
	}
}

// TakeSlot picks the engine slot a claimed generation runs on: with reuse,
// the idle one whose cache holds the longest part of chain (the prompt's
// hashes), else the least recently used, whose cache is the one least
// likely to be asked for. The slot then holds chain. -1: the node does
// not know the engine's slots (the engine picks). Call it after Claim
// granted the slot, PutSlot before its release.
func (g *Generations) TakeSlot(poolID, url string, chain []uint64, reuse bool) int {
	if g == nil {
		return -1
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	e := g.engines[engineKey{poolID, url}]
	if e == nil {
		return -1
	}
	best, shared := -1, 0
	for i, c := range e.caches {
		if c.busy {
			continue
		}
		n := 0
		if reuse {
			n = prefix.Shared(c.chain, chain)
		}
		if best < 0 || n > shared || (n == shared && c.lastUsed < e.caches[best].lastUsed) {
			best, shared = i, n
		}
	}
	if best >= 0 {
		e.caches[best].busy, e.caches[best].chain = true, chain
		g.changedLocked(engineKey{poolID, url}, e)
	}
	return best
}

// PutSlot gives slot back with the chain its cache holds now (nil:
// unknown, nothing is matched against it).
func (g *Generations) PutSlot(poolID, url string, slot int, chain []uint64) {
	if g == nil || slot < 0 {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	k := engineKey{poolID, url}
	e := g.engines[k]
	if e == nil || slot >= len(e.caches) {
		return
	}
	e.uses++
	e.caches[slot] = slotCache{chain: chain, lastUsed: e.uses}
	g.changedLocked(k, e)
}
