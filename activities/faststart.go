package activities

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/task"
)

// The fast start (docs/tasks.md, "The fast start"): the replica that admits
// a task sends its generation over the node link while the task's workflow
// starts. The node runs it at once; the workflow's Generate activity, when
// it comes (Attach), takes it over and supervises it. Every generation of
// the node is in one registry by task, so a task has one generation here at
// a time and a generation started ahead of its workflow runs once: a second
// start of the task is refused, an activity that comes first is the
// generation (the late start is refused), and one nobody claims within
// node.LinkFastStartClaim is cancelled, its tokens kept for an activity
// that comes later to resume from.

// errUnclaimed is the cause a generation nobody claimed is cancelled with:
// its node stream stays open, so a resume continues it with no gap.
var errUnclaimed = errors.New("no Generate activity claimed the generation")

// tombstoneKeep is how long the node remembers a task's ended generation:
// a fast start arriving later (a slow link request) is refused, not run a
// second time. It outlives any start's way over the link.
const tombstoneKeep = 10 * time.Minute

// run is one generation on the node.
type run struct {
	in    GenerateInput
	ahead bool // started by the node link, ahead of its workflow
	// reuseStream: continue the node stream a cancelled run ahead left.
	reuseStream bool

	cancel context.CancelCauseFunc
	done   chan struct{} // closed when the generation returned
	res    task.Result
	err    error

	// Guarded by runs.mu.
	claimed   bool        // a Generate activity supervises it
	abandoned bool        // cancelled unclaimed: a late activity resumes from it
	finished  bool        // the generation returned
	timer     *time.Timer // the claim bound of a run ahead
	at        time.Time   // started

	mu   sync.Mutex // guards prog
	prog task.Progress
}

// beat is what a heartbeat carries: counts, not tokens.
func (r *run) beat() task.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return task.Progress{Produced: len(r.prog.Tokens), TokensIn: r.prog.TokensIn}
}

func (r *run) progress() task.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return task.Progress{Tokens: append([]int32(nil), r.prog.Tokens...), Pieces: append([]string(nil), r.prog.Pieces...),
		TokensIn: r.prog.TokensIn}
}

// promptLen records the prompt's length in tokens, once known.
func (r *run) promptLen(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.prog.TokensIn = n
}

// runs is the node's registry of generations by task.
type runs struct {
	mu    sync.Mutex
	m     map[string]*run
	ended map[string]time.Time // task -> when its last generation ended
	swept time.Time
}

// sweep forgets tombstones, and runs ahead nobody claimed, older than
// tombstoneKeep, at most once a minute. Called with rs.mu held.
func (rs *runs) sweep(now time.Time) {
	if now.Sub(rs.swept) < time.Minute {
		return
	}
	rs.swept = now
	for id, at := range rs.ended {
		if now.Sub(at) > tombstoneKeep {
			delete(rs.ended, id)
		}
	}
	for _, r := range rs.m {
		if r.ahead && !r.claimed && r.finished && now.Sub(r.at) > tombstoneKeep {
			rs.forget(r)
		}
	}
}

// claim is a Generate activity's way in: the run ahead it attaches to
// (in.Attach, same slot, not claimed yet: running, or ended with its
// result), or a new run registered as its own. resumeFrom is a run ahead
// that was cancelled unclaimed: wait for it to return, then resume from
// its tokens.
func (rs *runs) claim(in GenerateInput) (r *run, attached bool, resumeFrom *run) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	id := in.Request.TaskID
	if old := rs.m[id]; old != nil && old.ahead && !old.claimed {
		switch {
		case !in.Attach || old.in.Where != in.Where:
			// Not this activity's to take (a workflow that placed the
			// task elsewhere): it must not run beside the activity's own.
			if !old.finished {
				old.abandoned = true
				old.cancel(errUnclaimed)
			}
		case !old.abandoned:
			old.claimed = true
			old.timer.Stop()
			return old, true, nil
		default:
			old.claimed = true
			resumeFrom = old
		}
	}
	if rs.m == nil {
		rs.m = map[string]*run{}
	}
	r = &run{in: in, claimed: true, at: time.Now(), done: make(chan struct{})}
	rs.m[id] = r
	return r, false, resumeFrom
}

// start registers a run ahead, unless the task has a generation here, with
// its context and its claim bound: a run is never in the registry without
// them (an activity may claim or replace it at once). unclaimed is told
// when the bound cancelled it.
func (rs *runs) start(in GenerateInput, within time.Duration, unclaimed func(*run)) (*run, context.Context, error) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	now := time.Now()
	rs.sweep(now)
	id := in.Request.TaskID
	if rs.m[id] != nil {
		return nil, nil, node.ErrGenerationExists
	}
	if at, ok := rs.ended[id]; ok && now.Sub(at) <= tombstoneKeep {
		return nil, nil, node.ErrGenerationExists
	}
	if rs.m == nil {
		rs.m = map[string]*run{}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	r := &run{in: in, ahead: true, at: now, done: make(chan struct{}), cancel: cancel}
	r.timer = time.AfterFunc(within, func() {
		if rs.abandon(r, errUnclaimed) {
			unclaimed(r)
		}
	})
	rs.m[id] = r
	return r, ctx, nil
}

// end takes a run that returned out, leaving its tombstone. A run ahead
// that no activity claimed stays: its activity, when it comes, takes its
// result (or resumes from its tokens if it was cancelled), until swept.
func (rs *runs) end(r *run) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	r.finished = true
	if r.ahead && !r.claimed {
		return
	}
	rs.forget(r)
}

// forget drops r, leaving its tombstone. Called with rs.mu held.
func (rs *runs) forget(r *run) {
	id := r.in.Request.TaskID
	if rs.m[id] == r {
		delete(rs.m, id)
	}
	if rs.ended == nil {
		rs.ended = map[string]time.Time{}
	}
	rs.ended[id] = time.Now()
}

// abandon cancels a running run ahead nobody claimed; false if it was
// claimed or has returned.
func (rs *runs) abandon(r *run, cause error) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if r.claimed || r.abandoned || r.finished {
		return false
	}
	r.abandoned = true
	r.cancel(cause)
	return true
}

// lookup is the task's run, if any.
func (rs *runs) lookup(taskID string) *run {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.m[taskID]
}

// FastStart is the node link's way to the node's generations
// (link.Generator): its own type, since every method of
// GenerateActivities is registered as an activity.
type FastStart struct{ G *GenerateActivities }

// StartEarly starts a task's generation ahead of its workflow (the node
// link's POST node.LinkTaskGeneratePath): on the slot req.FastStart names,
// which must be this node's. The generation runs as the workflow's would;
// its events go to the node's stream of the task at once. It is refused
// with ErrGenerationExists when the node runs or ran a generation of the
// task, and cancelled when no Generate activity claims it within
// ClaimWithin.
func (f FastStart) StartEarly(req task.Request) error {
	g := f.G
	w := req.FastStart
	if w == nil || w.NodeID != g.NodeID || w.PoolID == "" || w.URL == "" {
		return fmt.Errorf("%w %s", node.ErrNotThisNode, g.NodeID)
	}
	log := g.log().With("task_id", req.TaskID, "pool_id", w.PoolID, "correlation_id", req.CorrelationID)
	within := g.ClaimWithin
	if within <= 0 {
		within = node.LinkFastStartClaim
	}
	in := GenerateInput{Request: req, Where: *w}
	r, ctx, err := g.runs.start(in, within, func(r *run) {
		g.Metrics.fastStart(g.NodeID, "abandoned")
		log.Warn("generation started ahead of its workflow: no Generate activity claimed it; cancelled (an activity that comes later resumes from its tokens)",
			"within", within, "tokens", r.beat().Produced)
	})
	if err != nil {
		g.Metrics.fastStart(g.NodeID, "refused")
		return err
	}
	g.Metrics.fastStart(g.NodeID, "started")
	log.Debug("generation started ahead of its workflow")
	key := outputs.Key(req.TaskID, "fast-start", 1)
	go func() {
		defer close(r.done)
		defer g.runs.end(r)
		r.res, r.err = g.generate(ctx, r, key)
	}()
	return nil
}

// CancelEarly cancels a task's generation started ahead of its workflow
// that no Generate activity claimed (the replica's workflow start failed,
// or the task was canceled before its activity came); a claimed one is
// its activity's to stop. It reports whether one was cancelled.
func (f FastStart) CancelEarly(taskID, reason string) bool {
	g := f.G
	r := g.runs.lookup(taskID)
	if r == nil || !r.ahead || !g.runs.abandon(r, fmt.Errorf("%w: %s", context.Canceled, reason)) {
		return false
	}
	g.Metrics.fastStart(g.NodeID, "canceled")
	g.log().Info("generation started ahead of its workflow canceled", "task_id", taskID, "reason", reason)
	return true
}
