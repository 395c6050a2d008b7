// Package placement chooses the pool a task runs on. It is a pure function
// of a snapshot of pools, so equal inputs give equal choices and it is
// cheap enough to run on every dispatch (see the benchmark).
package placement

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/task"
)

// Candidate is a pool as placement sees it.
type Candidate struct {
	PoolID     string
	NodeID     string
	ModelID    string
	URL        string
	Epoch      int64
	State      pool.State
	Draining   bool
	NodeOnline bool
	SlotsTotal int
	CtxPerSlot int // tokens a slot holds (0: unknown, the model's)
	Engine     pool.Engine
	// Embeddings: the pool serves embeddings only.
	Embeddings bool
	// SlotsBusy is the generations running on the engine, as its node's
	// link shows them.
	SlotsBusy int
	// Queued and QueuedInteractive wait at the node for a slot (its link);
	// interactive ones go first there.
	Queued, QueuedInteractive int
	// ServiceMs is how long a generation holds a slot there (the node's
	// EWMA; 0: unknown).
	ServiceMs int64
	// Claims counts the claims the node's engine took or queued (its link):
	// a dispatch shows once it moves.
	Claims uint64
	// Pending is this scheduler's dispatches to the pool its node's link
	// does not show yet.
	Pending  int
	FreeVRAM uint64 // the node's, from its last heartbeat
	// Prefixes are the prompt chain hashes its slot caches hold (its
	// node's link; sorted).
	Prefixes []uint64
}

// Request is what a task asks of placement.
type Request struct {
	ModelID   string
	Placement task.Placement
	Exclude   []string // pools the task must leave (it was lost there)
	// NoPoolGrace: how long the task may wait for a pool to (re)appear
	// before it fails with no pool (0: the scheduler's default).
	NoPoolGrace time.Duration
	// Queue: the task may join a busy pool's queue at its node. Any Ready
	// pool serves, the one with the shortest expected wait first ((busy +
	// queued + pending) / slots), then most free VRAM, then pool id; ErrBusy
	// then means no pool that may serve is Ready yet. Without it only a
	// pool with a free slot serves.
	Queue bool
	// Embeddings asks for a pool that serves embeddings; without it only
	// pools that generate serve.
	Embeddings bool
	// Prefix is the chain of the task's prompt (package prefix). Unless
	// Placement.KVHint is cold, the pool whose caches hold the longest
	// prefix of it serves, while its expected wait stays within
	// CacheSlack of the least loaded pool's.
	Prefix []prefix.Link
}

// CacheSlack is how much longer a pool's queue may be, in generations per
// slot, than the least loaded pool's for a task to still go where its
// prompt's prefix is cached: a cached prefix saves its decode, a queue
// costs whole generations, so beyond one per slot load wins.
const CacheSlack = 1

var (
	// ErrNoPool: no pool could serve the task now or later (none holds the
	// model, or placement rules exclude every one).
	ErrNoPool = errors.New("no pool serves the model")
	// ErrBusy: pools could serve it but none has a free slot now.
	ErrBusy = errors.New("every pool that can serve the task is busy")
)

func (c *Candidate) free() int { return c.SlotsTotal - c.SlotsBusy }

// engine is c's engine; a pool whose record names none runs the built-in
// one (the default since pools had engines).
func (c *Candidate) engine() pool.Engine {
	if c.Engine == "" {
		return pool.Builtin
	}
	return c.Engine
}

// may says whether c could serve r at all (now or once it is ready).
func may(c *Candidate, r *Request) bool {
	if c.ModelID != r.ModelID || !c.NodeOnline || c.Draining || c.Embeddings != r.Embeddings {
		return false
	}
	switch c.State {
	case pool.Ready, pool.Starting, pool.Unready:
	default:
		return false
	}
	p := &r.Placement
	if p.NodeID != "" && c.NodeID != p.NodeID {
		return false
	}
	if p.Engine != "" && p.Engine != task.EngineAny && string(c.engine()) != p.Engine {
		return false
	}
	// A slot of unknown size cannot be shown to hold what the task needs.
	if p.MinCtx > 0 && c.CtxPerSlot < p.MinCtx {
		return false
	}
	return !slices.Contains(p.AvoidPools, c.PoolID) && !slices.Contains(r.Exclude, c.PoolID)
}

func now(c *Candidate, r *Request) bool {
	return c.State == pool.Ready && (r.Queue || c.free() > 0)
}

// Load is the generations ahead of a task joining c's queue: running,
// waiting at the node, and dispatched but not shown yet.
func (c *Candidate) Load() int { return c.SlotsBusy + c.Queued + c.Pending }

// better orders by most free VRAM, then fewest busy slots, then pool id;
// when queueing, by shortest expected wait (load per slot) first.
func better(a, b *Candidate, r *Request) bool {
	if r.Queue {
		// a.Load/a.slots < b.Load/b.slots, in integers.
		x, y := a.Load()*max(b.SlotsTotal, 1), b.Load()*max(a.SlotsTotal, 1)
		if x != y {
			return x < y
		}
		if a.FreeVRAM != b.FreeVRAM {
			return a.FreeVRAM > b.FreeVRAM
		}
		return a.PoolID < b.PoolID
	}
	if a.FreeVRAM != b.FreeVRAM {
		return a.FreeVRAM > b.FreeVRAM
	}
	if a.SlotsBusy != b.SlotsBusy {
		return a.SlotsBusy < b.SlotsBusy
	}
	return a.PoolID < b.PoolID
}

// Choose picks the pool for r among cands. A pinned pool that cannot serve
// is an error, never a silent fallback; preferred pools come first and,
// unless allow_fallback is false, others after them.
func Choose(cands []Candidate, r Request) (*Candidate, error) {
	p := r.Placement
	if p.Mode == "pin" || p.PinPoolID != "" {
		for i := range cands {
			c := &cands[i]
			if c.PoolID != p.PinPoolID {
				continue
			}
			if !may(c, &r) {
				return nil, fmt.Errorf("%w: pinned pool %s cannot serve model %s (state %s, draining %v, node online %v, engine %s, ctx per slot %d)",
					ErrNoPool, c.PoolID, r.ModelID, c.State, c.Draining, c.NodeOnline, c.Engine, c.CtxPerSlot)
			}
			if c.State != pool.Ready {
				return nil, fmt.Errorf("%w: pinned pool %s is %s", ErrNoPool, c.PoolID, c.State)
			}
			if !now(c, &r) {
				return nil, ErrBusy
			}
			return c, nil
		}
		return nil, fmt.Errorf("%w: pinned pool %s does not exist", ErrNoPool, p.PinPoolID)
	}
	var best, bestPreferred *Candidate
	servable := false
	for i := range cands {
		c := &cands[i]
		if !may(c, &r) {
			continue
		}
		servable = true
		if !now(c, &r) {
			continue
		}
		if slices.Contains(p.PreferPools, c.PoolID) && (bestPreferred == nil || better(c, bestPreferred, &r)) {
			bestPreferred = c
		}
		if best == nil || better(c, best, &r) {
			best = c
		}
	}
	if bestPreferred != nil {
		return cached(cands, &r, bestPreferred, func(c *Candidate) bool { return slices.Contains(p.PreferPools, c.PoolID) }), nil
	}
	if len(p.PreferPools) > 0 && p.AllowFallback != nil && !*p.AllowFallback {
		best = nil
	}
	switch {
	case best != nil:
		return cached(cands, &r, best, func(*Candidate) bool { return true }), nil
	case servable:
		return nil, ErrBusy
	}
	return nil, fmt.Errorf("%w: %s", ErrNoPool, r.ModelID)
}

// cached is the pool among those in that serves r now and holds the
// longest prefix of its prompt, when its wait is within CacheSlack of
// base's (the least loaded); else base.
func cached(cands []Candidate, r *Request, base *Candidate, in func(*Candidate) bool) *Candidate {
	if r.Placement.KVHint == task.KVCold || len(r.Prefix) == 0 {
		return base
	}
	pick, held := base, prefix.Held(r.Prefix, base.Prefixes)
	for i := range cands {
		c := &cands[i]
		if c == base || !in(c) || !may(c, r) || !now(c, r) || !withinSlack(c, base, r) {
			continue
		}
		if n := prefix.Held(r.Prefix, c.Prefixes); n > held || (n == held && n > 0 && better(c, pick, r)) {
			pick, held = c, n
		}
	}
	return pick
}

// withinSlack: c's expected wait ((load) per slot) is at most CacheSlack
// generations longer than base's. Without queueing every pool that serves
// now has a free slot: no wait.
func withinSlack(c, base *Candidate, r *Request) bool {
	if !r.Queue {
		return true
	}
	cs, bs := max(c.SlotsTotal, 1), max(base.SlotsTotal, 1)
	// c.Load/cs <= base.Load/bs + CacheSlack, in integers.
	return c.Load()*bs <= base.Load()*cs+CacheSlack*cs*bs
}
