package workflows

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
)

// Pool runs one llama.cpp engine on a node and keeps it alive: it stages
// the model, checks memory, starts the engine (Ready once /health answers
// 200 and the handoff is written), supervises it, restarts it with
// exponential backoff and jitter, and opens the circuit (Failed) after
// MaxConsecutiveFailures. A restarted worker's engine of the current epoch
// is adopted, any other is fenced. Reload switches models; a drain stops
// the pool, and the workflow ends.
func Pool(ctx workflow.Context, in pool.Input) (pool.Health, error) {
	p := &poolWF{spec: in.Spec, canEvents: in.ContinueAsNewEvents,
		wake:     workflow.NewBufferedChannel(ctx, 1),
		adoptCh:  workflow.NewBufferedChannel(ctx, 1),
		reloadCh: workflow.NewBufferedChannel(ctx, 1)}
	p.h = pool.Health{PoolID: in.Spec.PoolID, NodeID: in.Spec.NodeID, ModelID: in.Spec.ModelID,
		Engine: in.Spec.Engine, Embeddings: in.Spec.Embeddings, State: pool.Starting, StateSince: workflow.Now(ctx), CtxSize: in.Spec.CtxSize}
	if c := in.Carry; c != nil {
		p.h, p.entry, p.failures, p.backoff, p.lastEpoch = c.Health, c.Entry, c.Failures, c.Backoff, c.LastEpoch
	}
	if err := workflow.SetQueryHandler(ctx, pool.QueryHealth, func() (pool.Health, error) { return p.h, nil }); err != nil {
		return p.h, err
	}
	ended := func() error {
		if p.h.State == pool.Stopped || p.h.State == pool.Failed {
			return temporal.NewNonRetryableApplicationError("pool "+p.spec.PoolID+" is "+string(p.h.State), pool.ErrEnded, nil)
		}
		return nil
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, pool.UpdateDrain, p.onDrain, workflow.UpdateHandlerOptions{
		Validator: func(workflow.Context, pool.DrainRequest) error { return ended() },
	}); err != nil {
		return p.h, err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, pool.UpdateHandoff, p.onHandoff, workflow.UpdateHandlerOptions{
		Validator: func(workflow.Context, pool.HandoffEvent) error { return ended() },
	}); err != nil {
		return p.h, err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, pool.UpdateReload, p.onReload, workflow.UpdateHandlerOptions{
		Validator: func(_ workflow.Context, r pool.ReloadRequest) error {
			if err := ended(); err != nil {
				return err
			}
			if err := model.ValidateID(r.ModelID); err != nil {
				return temporal.NewNonRetryableApplicationError(err.Error(), pool.ErrInvalidParams, nil)
			}
			if p.draining {
				return temporal.NewNonRetryableApplicationError("pool "+p.spec.PoolID+" is draining", pool.ErrDraining, nil)
			}
			if !p.h.Reload.Finished() {
				return temporal.NewNonRetryableApplicationError(fmt.Sprintf("pool %s is already reloading to %s (step %s)",
					p.spec.PoolID, p.h.Reload.ToModel, p.h.Reload.Step), pool.ErrReloadInProgress, nil)
			}
			return nil
		},
	}); err != nil {
		return p.h, err
	}
	if in.Carry == nil {
		p.set(ctx, pool.Starting, "")
	} else {
		p.set(ctx, p.h.State, "") // search attributes of the new run
	}
	err := p.run(ctx)
	var can *workflow.ContinueAsNewError
	if errors.As(err, &can) {
		return p.h, err
	}
	if err != nil {
		p.set(ctx, pool.Failed, failureReason(err))
	}
	_ = workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) })
	return p.h, nil
}

type poolWF struct {
	spec      pool.Spec
	entry     model.Entry
	h         pool.Health
	draining  bool
	deadline  time.Duration // drain: how long in-flight generations may run
	failures  int
	backoff   time.Duration
	lastEpoch int64 // the newest epoch handed out (a failed reload's included)
	starting  int64 // the epoch being started, 0 when none
	canEvents int
	// next is an engine to supervise without starting one: adopted from a
	// restarted worker, or the new engine of a reload.
	next *pool.Handoff
	// gone: a restarted worker found the serving engine dead; restart now.
	gone     bool
	wake     workflow.Channel // drain
	adoptCh  workflow.Channel
	reloadCh workflow.Channel
}

// superviseHeartbeat: an engine supervisor silent this long means the node
// is lost (dead, or cut off); the pool gives it up and restarts when it can.
const superviseHeartbeat = 15 * time.Second

var (
	errSwitched = errors.New("supervision moves to another engine")
	errNodeLeft = errors.New("node left")
)

func (p *poolWF) onDrain(ctx workflow.Context, r pool.DrainRequest) (pool.Health, error) {
	recordActor(ctx, r.Actor, "drain")
	if !p.draining {
		p.draining = true
		p.deadline = time.Duration(r.DeadlineMs) * time.Millisecond
		p.h.Draining = true
		p.set(ctx, pool.Draining, "")
		p.wake.SendAsync(struct{}{})
	}
	// Answer once the engine is stopped.
	err := workflow.Await(ctx, func() bool { return p.h.State == pool.Stopped || p.h.State == pool.Failed })
	return p.h, err
}

// onHandoff is the node's word on a handoff file. A fresh one for the epoch
// being started is the readiness event; one a restarted worker found is
// adopted if it is the epoch the pool serves. Any other engine is not the
// pool's, and the node fences it.
func (p *poolWF) onHandoff(ctx workflow.Context, ev pool.HandoffEvent) (pool.HandoffReply, error) {
	h := ev.Handoff
	switch {
	case p.draining:
		return pool.HandoffReply{Reason: "pool is draining"}, nil
	case ev.Gone:
		if h.Epoch != p.h.Epoch || p.next != nil || p.starting != 0 || !p.h.Reload.Finished() || p.gone {
			return pool.HandoffReply{Reason: fmt.Sprintf("epoch %d is not the serving epoch (%d)", h.Epoch, p.h.Epoch)}, nil
		}
		p.gone = true
		p.adoptCh.SendAsync(struct{}{})
		return pool.HandoffReply{Accept: true}, nil
	case ev.Adopt && h.Epoch == p.h.Epoch && p.next == nil && p.h.Reload.Finished():
		p.next = &h
		p.adoptCh.SendAsync(struct{}{})
		workflow.GetLogger(ctx).Info("adopting engine of a restarted worker", "pool_id", p.spec.PoolID, "epoch", h.Epoch, "pid", h.PID)
		return pool.HandoffReply{Accept: true}, nil
	case ev.Adopt:
		return pool.HandoffReply{Reason: fmt.Sprintf("epoch %d is not the serving epoch (%d)", h.Epoch, p.h.Epoch)}, nil
	case h.Epoch == p.starting:
		if p.h.Reload.Finished() && p.h.State != pool.Ready {
			p.ready(ctx, h) // the readiness event, before StartEngine's result
		}
		return pool.HandoffReply{Accept: true}, nil
	case h.Epoch == p.h.Epoch:
		return pool.HandoffReply{Accept: true}, nil
	}
	return pool.HandoffReply{Reason: fmt.Sprintf("epoch %d is stale: the pool runs epoch %d", h.Epoch, p.h.Epoch)}, nil
}

// onReload queues a reload and answers once its mode is known (or it
// failed before): the switch itself goes on in the background, followed in
// Health.Reload.
func (p *poolWF) onReload(ctx workflow.Context, r pool.ReloadRequest) (pool.ReloadStatus, error) {
	recordActor(ctx, r.Actor, "reload to "+r.ModelID)
	st := &pool.ReloadStatus{FromModel: p.spec.ModelID, ToModel: r.ModelID, Step: "queued", StartedAt: workflow.Now(ctx)}
	p.h.Reload = st
	p.reloadCh.SendAsync(r)
	err := workflow.Await(ctx, func() bool {
		return st.Mode != "" || st.Finished() || p.h.State == pool.Stopped || p.h.State == pool.Failed
	})
	return *st, err
}

func (p *poolWF) onNode(ctx workflow.Context, o workflow.ActivityOptions) workflow.Context {
	o.TaskQueue = node.TaskQueue(p.spec.NodeID)
	return workflow.WithActivityOptions(ctx, o)
}

// stage reads a model's catalog entry and stages it onto the node.
func (p *poolWF) stage(ctx workflow.Context, modelID string) (model.Entry, error) {
	var ca *activities.CatalogActivities
	var entry model.Entry
	if err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: time.Minute,
	}), ca.Entry, modelID).Get(ctx, &entry); err != nil {
		return entry, err
	}
	var sc *activities.StagingControl
	err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: StageDeadline, HeartbeatTimeout: 30 * time.Second,
		Summary: fmt.Sprintf("stage %s onto %s (starts or joins %s)", entry.ID, p.spec.NodeID, model.StageWorkflowID(p.spec.NodeID, entry.SHA256)),
	}), sc.EnsureStaged, model.StageRequest{NodeID: p.spec.NodeID, Entry: entry}).Get(ctx, nil)
	return entry, err
}

func (p *poolWF) preflight(ctx workflow.Context, spec pool.Spec, entry model.Entry) error {
	var ea *activities.EngineActivities
	return workflow.ExecuteActivity(p.onNode(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: time.Minute,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 3},
		Summary:             "memory preflight for " + entry.ID,
	}), ea.Preflight, activities.PreflightInput{Spec: spec, SHA256: entry.SHA256}).Get(ctx, nil)
}

func (p *poolWF) newEpoch() int64 {
	p.lastEpoch = max(p.lastEpoch, p.h.Epoch) + 1
	return p.lastEpoch
}

func (p *poolWF) run(ctx workflow.Context) error {
	var ea *activities.EngineActivities
	if p.entry.SHA256 == "" { // a first run; a continued one has its model
		entry, err := p.stage(ctx, p.spec.ModelID)
		if err != nil {
			return err
		}
		if err := p.preflight(ctx, p.spec, entry); err != nil {
			return err
		}
		p.entry = entry
		p.backoff = pool.BackoffInitial
	}

	for !p.draining {
		var h pool.Handoff
		var err error
		if p.next != nil {
			h, p.next = *p.next, nil
		} else {
			if can := p.continueAsNew(ctx); can != nil {
				return can
			}
			p.h.Epoch = p.newEpoch()
			h, err = p.start(ctx, ea)
			if errors.Is(err, errSwitched) {
				continue // adopted meanwhile
			}
		}
		if err == nil {
			p.ready(ctx, h)
			var res activities.SuperviseResult
			res, err = p.supervise(ctx, ea, h)
			if p.draining {
				break
			}
			if errors.Is(err, errSwitched) {
				p.restartGone(ctx)
				continue
			}
			if err == nil && res.WorkerStopped {
				err = errNodeLeft
			}
			if err == nil {
				err = errors.New(res.Reason + lastLines(res.LogTail))
				if time.Duration(res.UptimeMs)*time.Millisecond >= pool.StableAfter {
					p.failures, p.backoff = 0, pool.BackoffInitial // it ran long enough: a fresh budget
				}
			}
		}
		if p.draining {
			break
		}
		p.h.SlotsFree = 0
		reason := failureReason(err)
		switch {
		case nodeLost(err):
			reason = fmt.Sprintf("NODE_OFFLINE: lost contact with node %s (its engine supervisor silent for %s)", p.spec.NodeID, superviseHeartbeat)
		case errors.Is(err, errNodeLeft):
			reason = "NODE_LEFT: the worker of node " + p.spec.NodeID + " shut down and stopped the engine"
		default:
			p.failures++
		}
		if p.failures >= pool.MaxConsecutiveFailures {
			return fmt.Errorf("circuit open after %d consecutive failures; last: %s", p.failures, reason)
		}
		p.h.Restarts++
		p.set(ctx, pool.Unready, reason)
		// Jitter comes from a side effect so replay sees the same value.
		var jitter float64
		_ = workflow.SideEffect(ctx, func(workflow.Context) any { return rand.Float64() }).Get(&jitter)
		wait := p.backoff/2 + time.Duration(jitter*float64(p.backoff/2))
		p.backoff = min(2*p.backoff, pool.BackoffMax)
		timer := workflow.NewTimer(ctx, wait)
		sel := workflow.NewSelector(ctx)
		sel.AddFuture(timer, func(workflow.Future) {})
		sel.AddReceive(p.wake, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil) })
		sel.AddReceive(p.adoptCh, func(c workflow.ReceiveChannel, _ bool) {
			c.Receive(ctx, nil)
			p.gone = false // down already: the start below is the restart
		})
		sel.AddReceive(p.reloadCh, func(c workflow.ReceiveChannel, _ bool) {
			var r pool.ReloadRequest
			c.Receive(ctx, &r)
			p.reloadIdle(ctx, r)
		})
		sel.Select(ctx)
	}
	p.set(ctx, pool.Stopped, "")
	return nil
}

// restartGone marks the restart of an engine that died while its worker
// was down (reported by the restarted worker).
func (p *poolWF) restartGone(ctx workflow.Context) {
	if !p.gone {
		return
	}
	p.gone = false
	p.h.Restarts++
	p.h.SlotsFree = 0
	p.set(ctx, pool.Unready, "ENGINE_GONE: the engine of epoch "+fmt.Sprint(p.h.Epoch)+" died while the worker of node "+p.spec.NodeID+" was down")
}

// continueAsNew bounds the history; it runs only while no engine runs, so
// the next run has nothing to take over but its state.
func (p *poolWF) continueAsNew(ctx workflow.Context) error {
	if p.h.Epoch == 0 || !p.h.Reload.Finished() {
		return nil
	}
	info := workflow.GetInfo(ctx)
	limit := p.canEvents
	if limit <= 0 {
		limit = pool.DefaultContinueAsNewEvents
	}
	if !info.GetContinueAsNewSuggested() && info.GetCurrentHistoryLength() < limit {
		return nil
	}
	// Updates that are still being answered finish in this run.
	if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
		return err
	}
	workflow.GetLogger(ctx).Info("pool continues as new", "pool_id", p.spec.PoolID, "events", info.GetCurrentHistoryLength())
	return workflow.NewContinueAsNewError(ctx, pool.WorkflowType, pool.Input{Spec: p.spec, ContinueAsNewEvents: p.canEvents,
		Carry: &pool.Carry{Health: p.h, Entry: p.entry, Failures: p.failures, Backoff: p.backoff, LastEpoch: p.lastEpoch}})
}

// start runs StartEngine for the current epoch. An adoption of that epoch
// (its worker restarted while the engine came up) ends the wait.
func (p *poolWF) start(ctx workflow.Context, ea *activities.EngineActivities) (pool.Handoff, error) {
	p.starting = p.h.Epoch
	defer func() { p.starting = 0 }()
	sctx, cancel := workflow.WithCancel(ctx)
	defer cancel()
	f := workflow.ExecuteActivity(p.onNode(sctx, startOptions(
		fmt.Sprintf("start %s engine for %s, epoch %d", p.spec.Engine, p.spec.PoolID, p.h.Epoch))), ea.StartEngine, activities.StartInput{Spec: p.spec, SHA256: p.entry.SHA256, Epoch: p.h.Epoch})
	var h pool.Handoff
	var err error
	sel := workflow.NewSelector(ctx)
	sel.AddFuture(f, func(f workflow.Future) { err = f.Get(ctx, &h) })
	sel.AddReceive(p.adoptCh, func(c workflow.ReceiveChannel, _ bool) {
		c.Receive(ctx, nil)
		err = errSwitched
	})
	sel.Select(ctx)
	return h, err
}

// startOptions are StartEngine's: one try (the pool's loop is the retry,
// with its backoff and circuit), heartbeating while the model loads.
func startOptions(summary string) workflow.ActivityOptions {
	return workflow.ActivityOptions{StartToCloseTimeout: 10 * time.Minute, HeartbeatTimeout: 30 * time.Second,
		RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1}, Summary: summary}
}

func (p *poolWF) ready(ctx workflow.Context, h pool.Handoff) {
	p.h.URL, p.h.PID, p.h.EngineVersion, p.h.SlotsTotal, p.h.SlotsFree = h.URL, h.PID, h.EngineVersion, h.Slots, h.Slots
	if p.h.State != pool.Ready {
		p.h.ReadyAt = workflow.Now(ctx)
	}
	p.set(ctx, pool.Ready, "")
}

// supervise runs the engine's supervisor until the engine ends, a drain
// cancels it (the supervisor then stops the engine and removes the
// handoff), a restarted worker's engine is adopted, or a reload switches to
// a new engine (errSwitched, with p.next set).
func (p *poolWF) supervise(ctx workflow.Context, ea *activities.EngineActivities, h pool.Handoff) (activities.SuperviseResult, error) {
	sctx, cancel := workflow.WithCancel(ctx)
	defer cancel()
	f := workflow.ExecuteActivity(p.onNode(sctx, workflow.ActivityOptions{
		StartToCloseTimeout: 365 * 24 * time.Hour, HeartbeatTimeout: superviseHeartbeat,
		// A worker that dies between the readiness event and picking up
		// the supervisor would otherwise leave the pool Ready, unwatched,
		// until it returns: a supervisor that never starts is a lost node.
		ScheduleToStartTimeout: superviseHeartbeat,
		RetryPolicy:            &temporal.RetryPolicy{MaximumAttempts: 1},
		WaitForCancellation:    true,
		Summary:                fmt.Sprintf("supervise %s (pid %d, epoch %d)", h.URL, h.PID, h.Epoch),
	}), ea.Supervise, activities.SuperviseInput{PoolID: p.spec.PoolID, Epoch: h.Epoch, URL: h.URL, PID: h.PID})
	var res activities.SuperviseResult
	var err error
	for done := false; !done; {
		sel := workflow.NewSelector(ctx)
		sel.AddFuture(f, func(f workflow.Future) { err = f.Get(ctx, &res); done = true })
		sel.AddReceive(p.wake, func(c workflow.ReceiveChannel, _ bool) {
			c.Receive(ctx, nil)
			p.drainEngine(ctx, ea, h)
			cancel()
			_ = f.Get(ctx, &res) // waits: the supervisor stops the engine
			done = true
		})
		sel.AddReceive(p.adoptCh, func(c workflow.ReceiveChannel, _ bool) {
			// The worker restarted and found this very engine: the old
			// supervisor is gone with it, so do not wait for it.
			c.Receive(ctx, nil)
			err, done = errSwitched, true
		})
		sel.AddReceive(p.reloadCh, func(c workflow.ReceiveChannel, _ bool) {
			var r pool.ReloadRequest
			c.Receive(ctx, &r)
			if p.reloadLive(ctx, ea, r, h, cancel, f) {
				err, done = errSwitched, true
			}
		})
		sel.Select(ctx)
	}
	return res, err
}

// drainEngine lets in-flight generations finish, up to the drain deadline.
func (p *poolWF) drainEngine(ctx workflow.Context, ea *activities.EngineActivities, h pool.Handoff) {
	// Runs recorded before drains waited for in-flight work replay as they
	// ran.
	v := workflow.GetVersion(ctx, "drain-waits-for-in-flight", workflow.DefaultVersion, 1)
	if v < 1 || p.deadline <= 0 {
		return
	}
	var dr activities.DrainResult
	_ = workflow.ExecuteActivity(p.onNode(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: p.deadline + 30*time.Second, HeartbeatTimeout: 10 * time.Second,
		RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1},
		Summary:     fmt.Sprintf("drain %s: wait up to %s for in-flight generations", p.spec.PoolID, p.deadline),
	}), ea.DrainEngine, activities.DrainInput{PoolID: p.spec.PoolID, URL: h.URL, Deadline: p.deadline}).Get(ctx, &dr)
	if dr.Busy > 0 {
		p.h.LastError = fmt.Sprintf("drain deadline %s passed with %d generations in flight", p.deadline, dr.Busy)
	}
}

// reloadLive switches the serving engine cur to another model. With room
// for both, the new engine starts beside the old one, which serves until
// the new one is ready and keeps serving if it fails. Without room, the old
// one is drained and stopped first; if the new one then fails, the loop
// restarts the old model. It reports whether supervision moves on (p.next).
func (p *poolWF) reloadLive(ctx workflow.Context, ea *activities.EngineActivities, r pool.ReloadRequest,
	cur pool.Handoff, stopOld func(), oldF workflow.Future) bool {
	st := p.h.Reload
	fail := func(err error, note string) bool {
		st.Step, st.Error, st.FinishedAt = "failed", err.Error()+note, workflow.Now(ctx)
		workflow.GetLogger(ctx).Warn("reload failed", "pool_id", p.spec.PoolID, "to_model", r.ModelID, "error", st.Error)
		p.set(ctx, p.h.State, "reload to "+r.ModelID+" failed: "+st.Error)
		return false
	}
	st.Step = "staging"
	p.set(ctx, p.h.State, "")
	entry, err := p.stage(ctx, r.ModelID)
	if err != nil {
		return fail(err, "; the old engine keeps serving")
	}
	spec := p.spec
	spec.ModelID = entry.ID
	st.Step = "preflight"
	err = p.preflight(ctx, spec, entry)
	var app *temporal.ApplicationError
	switch {
	case err == nil:
		st.Mode = pool.SideBySide
	case errors.As(err, &app) && (app.Type() == pool.ErrInsufficientVRAM || app.Type() == pool.ErrInsufficientRAM):
		st.Mode = pool.DrainFirst
	default:
		return fail(err, "; the old engine keeps serving")
	}

	st.Epoch = p.newEpoch()
	startOpts := startOptions(fmt.Sprintf("reload %s: start %s engine for %s, epoch %d", p.spec.PoolID, entry.ID, p.spec.PoolID, st.Epoch))
	in := activities.StartInput{Spec: spec, SHA256: entry.SHA256, Epoch: st.Epoch, Keep: cur.Epoch}
	if st.Mode == pool.DrainFirst {
		st.Step = "draining"
		p.deadline = time.Duration(r.DeadlineMs) * time.Millisecond
		p.set(ctx, pool.Draining, "reload to "+entry.ID+": no room for both engines; draining the old one first")
		p.drainEngine(ctx, ea, cur)
		stopOld()
		_ = oldF.Get(ctx, nil)
		p.h.SlotsFree = 0
		p.set(ctx, pool.Starting, "")
		if err := p.preflight(ctx, spec, entry); err != nil {
			p.next = nil
			fail(err, "; restarting the old model")
			return false // the old supervisor has ended: the loop restarts the old model
		}
		in.Keep = 0
	}
	st.Step = "starting"
	var h pool.Handoff
	p.starting = st.Epoch
	err = workflow.ExecuteActivity(p.onNode(ctx, startOpts), ea.StartEngine, in).Get(ctx, &h)
	p.starting = 0
	if err != nil {
		if st.Mode == pool.DrainFirst {
			return fail(err, "; restarting the old model")
		}
		return fail(err, "; the old engine keeps serving")
	}
	// Switch: the handoff file already names the new engine.
	old := p.h.Epoch
	p.spec, p.entry = spec, entry
	p.h.ModelID, p.h.Epoch = entry.ID, st.Epoch
	if st.Mode == pool.SideBySide {
		stopOld() // its supervisor stops the old epoch only
		_ = oldF.Get(ctx, nil)
	}
	st.Step, st.FinishedAt = "done", workflow.Now(ctx)
	workflow.GetLogger(ctx).Info("reloaded", "pool_id", p.spec.PoolID, "model_id", entry.ID, "mode", st.Mode, "from_epoch", old, "epoch", st.Epoch)
	p.next = &h
	p.failures, p.backoff = 0, pool.BackoffInitial
	return true
}

// reloadIdle changes the model of a pool whose engine is down: the next
// start uses it, at once and with a fresh failure budget.
func (p *poolWF) reloadIdle(ctx workflow.Context, r pool.ReloadRequest) {
	st := p.h.Reload
	st.Mode, st.Step = pool.Replace, "staging"
	entry, err := p.stage(ctx, r.ModelID)
	if err == nil {
		spec := p.spec
		spec.ModelID = entry.ID
		st.Step = "preflight"
		if err = p.preflight(ctx, spec, entry); err == nil {
			p.spec, p.entry = spec, entry
			p.h.ModelID = entry.ID
			p.failures, p.backoff = 0, pool.BackoffInitial
			st.Step, st.FinishedAt = "done", workflow.Now(ctx)
			p.set(ctx, p.h.State, "")
			return
		}
	}
	st.Step, st.Error, st.FinishedAt = "failed", err.Error(), workflow.Now(ctx)
	p.set(ctx, p.h.State, "reload to "+r.ModelID+" failed: "+st.Error)
}

// nodeLost says the failure is the node's (heartbeat lost), not the
// engine's: it does not count toward the circuit.
func nodeLost(err error) bool {
	var timeout *temporal.TimeoutError
	return errors.As(err, &timeout) && (timeout.TimeoutType() == enumspb.TIMEOUT_TYPE_HEARTBEAT ||
		timeout.TimeoutType() == enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START)
}

func lastLines(tail string) string {
	if tail == "" {
		return ""
	}
	return "; engine log: " + tail
}

func (p *poolWF) set(ctx workflow.Context, st pool.State, lastErr string) {
	if st != p.h.State {
		p.h.State, p.h.StateSince = st, workflow.Now(ctx)
	}
	if lastErr != "" {
		p.h.LastError = lastErr
	}
	p.h.Ready = st == pool.Ready
	p.h.Live = st == pool.Ready || st == pool.Draining
	attrs := []temporal.SearchAttributeUpdate{pool.PoolIDKey.ValueSet(p.spec.PoolID),
		node.NodeIDKey.ValueSet(p.spec.NodeID), model.ModelIDKey.ValueSet(p.spec.ModelID)}
	// Runs recorded before the cluster view read pool states from
	// visibility upserted no PoolState, and replay as they ran.
	if workflow.GetVersion(ctx, "pool-state-search-attribute", workflow.DefaultVersion, 1) >= 1 {
		attrs = append(attrs, pool.StateKey.ValueSet(string(p.h.State)))
	}
	_ = workflow.UpsertTypedSearchAttributes(ctx, attrs...)
	reload := ""
	if r := p.h.Reload; r != nil {
		reload = fmt.Sprintf("\n\nreload %s → %s: %s %s %s", r.FromModel, r.ToModel, r.Mode, r.Step, r.Error)
	}
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**%s** pool %s on %s, model %s, %s engine\n\nurl %s, pid %d, epoch %d, restarts %d\n\n%s%s",
		p.h.State, p.spec.PoolID, p.spec.NodeID, p.spec.ModelID, p.spec.Engine, p.h.URL, p.h.PID, p.h.Epoch, p.h.Restarts, p.h.LastError, reload))
}

var errorCode = regexp.MustCompile(`^[A-Z][A-Z0-9_]+$`)

// failureReason is what a client reads of a failure: an application
// error's code and message, without the activity and child workflow
// wrapping around it (which repeats the message at every level).
func failureReason(err error) string {
	var app *temporal.ApplicationError
	if !errors.As(err, &app) {
		return err.Error()
	}
	msg := app.Message()
	if code := app.Type(); errorCode.MatchString(code) && !strings.HasPrefix(msg, code) {
		msg = code + ": " + msg
	}
	return msg
}
