package scheduler

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
)

// TaskStarter starts an admitted task's workflow (control.Tasks).
type TaskStarter interface {
	Start(ctx context.Context, req task.Request) error
}

// FastStarter sends an admitted task's generation to the node of its
// granted slot over the node link, ahead of its workflow (link.Starter),
// and calls it off.
type FastStarter interface {
	Start(ctx context.Context, req task.Request) error
	Cancel(ctx context.Context, where task.Where, taskID, reason string) error
}

// PoolCreator starts a pool's workflow (control.Pools).
type PoolCreator interface {
	Create(ctx context.Context, s pool.Spec) (string, error)
}

// AutoPools is the policy --auto-pools: a task for a model no pool serves
// starts a pool for it, on the node its placement names or else the one
// NodeForPool picks.
type AutoPools struct {
	Pools PoolCreator
	Nodes NodeLister
	Slots int // per pool, at least 1
	Ctx   int // context of the pool (0: the model's)
}

// NoPoolError refuses a task no pool can serve, nor one started for it.
type NoPoolError struct {
	ModelID string
	Err     error // placement's ErrNoPool, or why no pool could be started
}

func (e *NoPoolError) Error() string {
	return fmt.Sprintf("no pool can serve model %s: %v", e.ModelID, e.Err)
}

func (e *NoPoolError) Unwrap() error { return e.Err }

// QueueFullError refuses a task whose priority's queue is full.
type QueueFullError struct {
	Priority task.Priority
	Backoff  time.Duration // how long the client should wait
}

func (e *QueueFullError) Error() string {
	return fmt.Sprintf("the %s queue is full; retry after %d ms", e.Priority, e.Backoff.Milliseconds())
}

func (e *QueueFullError) Unwrap() error { return ErrQueueFull }

// Admit admits a task and starts its workflow: it refuses a task no pool
// can serve (after a fresh read of the pools, and after starting one under
// AutoPools unless the task is pinned) with a NoPoolError, a session that
// has had its turns with a SessionFullError, and a task its queue has no
// room for with a QueueFullError; a workflow that cannot start (a task id
// used before: control.ErrTaskExists) leaves no ticket behind, and a retry
// of a task it holds is ErrTaskExists at once, its ticket untouched. Prepared is
// set whenever a pool was started, even if admission then failed. With
// FastStart, a task granted a Ready pool's slot has its generation sent to
// that node while its workflow starts; Admit returns once the start is
// durable.
func (s *Scheduler) Admit(ctx context.Context, req task.Request) (Admission, error) {
	return s.admit(ctx, req, nil)
}

// AdmitAhead admits as Admit does, for a client that reads the task's
// stream at once and whose leaving cancels the task (/v1 streaming): with
// a fast start it returns once the generation is on its way to its node,
// and starts the workflow once first closes (the stream's first token:
// the durable start's work then does not compete with it for the CPUs)
// or after aheadStartWait; Admission.Durable tells how that went (a start
// that failed has called the generation off and given the ticket and the
// session's turn back).
func (s *Scheduler) AdmitAhead(ctx context.Context, req task.Request, first <-chan struct{}) (Admission, error) {
	return s.admit(ctx, req, first)
}

// aheadStartWait bounds how long AdmitAhead defers the workflow's start
// for the first token.
const aheadStartWait = 250 * time.Millisecond

// admit admits req; first nil: the start is durable when it returns.
func (s *Scheduler) admit(ctx context.Context, req task.Request, first <-chan struct{}) (Admission, error) {
	durable := first == nil
	// A retry of a task this scheduler holds (a client retrying POST
	// /v2/tasks with its task_id) must not touch the original's ticket: it
	// is refused before any. The claim makes two racing admissions of one
	// id one admission and one refusal.
	claim := admitKey{s, req.TaskID}
	if _, racing := admitting.LoadOrStore(claim, struct{}{}); racing {
		return Admission{}, control.ErrTaskExists
	}
	defer admitting.Delete(claim)
	if s.holds(req.TaskID) {
		return Admission{}, control.ErrTaskExists
	}
	pr := placement.Request{ModelID: req.ModelID, Placement: req.Placement, Prefix: prefix.Of(req)}
	err := s.servable(pr)
	if err != nil {
		// The snapshot may predate a pool just created: look again.
		s.reread(ctx)
		err = s.servable(pr)
	}
	var prepared *pool.Spec
	if err != nil && s.AutoPools != nil && req.Placement.Mode != "pin" && req.Placement.PinPoolID == "" {
		if prepared, err = s.startPool(ctx, req); err == nil {
			err = s.servable(pr)
		}
	}
	if err != nil {
		s.Metrics.rejected("pool_unavailable")
		return Admission{Prepared: prepared}, &NoPoolError{ModelID: req.ModelID, Err: err}
	}
	turn, err := s.takeTurn(ctx, req)
	if err != nil {
		return Admission{Prepared: prepared}, err
	}
	adm, err := s.enqueue(req.TaskID, req.Priority, pr, req.EnqueuedAt)
	adm.Prepared = prepared
	if err != nil {
		s.giveBack(ctx, req, turn)
		return adm, &QueueFullError{Priority: req.Priority, Backoff: s.backoff()}
	}
	if s.FastStart != nil {
		if w, ok := s.Granted(req.TaskID); ok {
			req.FastStart, adm.FastStart = &w, true
		}
	}
	if req.FastStart == nil || durable {
		err = s.start(ctx, req, turn, nil)
		adm.durable = closed(err)
		return adm, err
	}
	started := make(chan error, 1)
	adm.durable = started
	// The client's first token waits for none of it: the start goes on
	// after the request's context (its values, the actor, stay).
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), startTimeout)
	go func() {
		defer cancel()
		started <- s.start(bg, req, turn, first)
	}()
	return adm, nil
}

// startTimeout bounds a workflow start that no request waits for.
const startTimeout = 30 * time.Second

// start starts the task's workflow, its generation sent ahead at the same
// time when req.FastStart names a slot. A start that fails gives the
// ticket and the session's turn back and calls the generation off (after
// its sending returned, so the call-off cannot overtake it). With first
// set the workflow starts once first closes (awaitFirst).
func (s *Scheduler) start(ctx context.Context, req task.Request, turn session.TurnResult, first <-chan struct{}) error {
	var sent *sending
	if w := req.FastStart; w != nil {
		sent = &sending{done: make(chan struct{})}
		go func() {
			defer close(sent.done)
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fastStartTimeout)
			defer cancel()
			if sent.err = s.FastStart.Start(sctx, req); sent.err != nil {
				// The workflow's Generate activity starts it on the node.
				s.Metrics.fastStart("failed")
				s.log().Info("fast start: the node did not take the generation; its workflow's activity will start it",
					"task_id", req.TaskID, "node_id", w.NodeID, "pool_id", w.PoolID, "err", sent.err)
			} else {
				s.Metrics.fastStart("sent")
			}
		}()
	}
	if first != nil {
		s.awaitFirst(ctx, first, sent)
	}
	err := s.Tasks.Start(ctx, req)
	if err == nil {
		return nil
	}
	// The ticket is this admission's own (no other held one, none
	// racing), granted or queued: a workflow of this id elsewhere keeps
	// its own.
	s.drop(req.TaskID)
	s.giveBack(ctx, req, turn)
	if sent != nil {
		go func() {
			if <-sent.done; sent.err != nil {
				return
			}
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fastStartTimeout)
			defer cancel()
			reason := "its workflow did not start: " + err.Error()
			if cerr := s.FastStart.Cancel(cctx, *req.FastStart, req.TaskID, reason); cerr != nil {
				s.log().Warn("fast start: the generation of a task that did not start was not called off; its node cancels it unclaimed",
					"task_id", req.TaskID, "node_id", req.FastStart.NodeID, "err", cerr)
				return
			}
			s.Metrics.fastStart("canceled")
		}()
	}
	return err
}

// sending is a generation on its way to its node: err is set when done
// closes.
type sending struct {
	done chan struct{}
	err  error
}

// awaitFirst waits until first closes (the stream's first token), the
// node refused the generation sent (no first token is coming then), or
// aheadStartWait passed.
func (s *Scheduler) awaitFirst(ctx context.Context, first <-chan struct{}, sent *sending) {
	var refused <-chan struct{}
	if sent != nil {
		refused = sent.done
	}
	wait := time.NewTimer(aheadStartWait)
	defer wait.Stop()
	for {
		select {
		case <-first:
		case <-wait.C:
		case <-ctx.Done():
		case <-refused:
			if sent.err == nil {
				refused = nil // sent: wait on for its first token
				continue
			}
		}
		return
	}
}

// fastStartTimeout bounds sending a generation ahead, and calling it off.
const fastStartTimeout = 10 * time.Second

func (s *Scheduler) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

func closed(err error) chan error {
	ch := make(chan error, 1)
	ch <- err
	return ch
}

// admitting holds the task ids being admitted, per scheduler.
var admitting sync.Map // admitKey -> struct{}

type admitKey struct {
	s  *Scheduler
	id string
}

// holds reports whether the scheduler has a ticket for task id (queued,
// or granted until its release).
func (s *Scheduler) holds(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tickets[id] != nil
}

// startPool starts a pool for req's model and announces it, so the task
// waits for it instead of failing while reads lag.
func (s *Scheduler) startPool(ctx context.Context, req task.Request) (*pool.Spec, error) {
	nodeID := req.Placement.NodeID
	if nodeID == "" {
		var err error
		if nodeID, err = NodeForPool(ctx, s.AutoPools.Nodes); err != nil || nodeID == "" {
			return nil, fmt.Errorf("no Online node to start a pool for %s on", req.ModelID)
		}
	}
	spec := pool.Spec{PoolID: autoPoolID(req.ModelID, nodeID), NodeID: nodeID, ModelID: req.ModelID, Engine: pool.Builtin,
		Slots: max(s.AutoPools.Slots, 1), CtxSize: s.AutoPools.Ctx}
	if _, err := s.AutoPools.Pools.Create(ctx, spec); err != nil && !errors.Is(err, control.ErrPoolExists) {
		return nil, err
	}
	s.announce(placement.Candidate{PoolID: spec.PoolID, NodeID: nodeID, ModelID: spec.ModelID,
		State: pool.Starting, NodeOnline: true, SlotsTotal: spec.Slots, CtxPerSlot: spec.CtxSize / spec.Slots, Engine: spec.Engine})
	return &spec, nil
}

// autoPoolID names a pool started for a model: auto-<model>-<node>, made
// a valid pool id.
func autoPoolID(modelID, nodeID string) string {
	b := []byte(strings.ToLower("auto-" + modelID + "-" + nodeID))
	for i, ch := range b {
		if !(ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9' || ch == '.' || ch == '_' || ch == '-') {
			b[i] = '-'
		}
	}
	if len(b) > 63 {
		sum := sha256.Sum256(b)
		b = append(b[:54], '-')
		b = append(b, hex.EncodeToString(sum[:4])...)
	}
	return strings.TrimRight(string(b), "-._")
}
