package workflows

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
)

// PoolInput starts a pool.
type PoolInput struct {
	Spec pool.Spec
}

// Pool runs one llama.cpp engine on a node and keeps it alive: it stages
// the model, checks memory, starts the engine (Ready once /health answers
// 200 and the handoff is written), supervises it, restarts it with
// exponential backoff and jitter, and opens the circuit (Failed) after
// MaxConsecutiveFailures. A drain stops it; the workflow then ends.
func Pool(ctx workflow.Context, in PoolInput) (pool.Health, error) {
	p := &poolWF{spec: in.Spec, wake: workflow.NewBufferedChannel(ctx, 1)}
	p.h = pool.Health{PoolID: in.Spec.PoolID, NodeID: in.Spec.NodeID, ModelID: in.Spec.ModelID,
		Engine: in.Spec.Engine, State: pool.Starting, StateSince: workflow.Now(ctx)}
	if err := workflow.SetQueryHandler(ctx, pool.QueryHealth, func() (pool.Health, error) { return p.h, nil }); err != nil {
		return p.h, err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, pool.UpdateDrain, p.onDrain, workflow.UpdateHandlerOptions{
		Validator: func(workflow.Context, pool.DrainRequest) error {
			if p.h.State == pool.Stopped || p.h.State == pool.Failed {
				return temporal.NewNonRetryableApplicationError("pool "+p.spec.PoolID+" is "+string(p.h.State), "POOL_ENDED", nil)
			}
			return nil
		},
	}); err != nil {
		return p.h, err
	}
	p.set(ctx, pool.Starting, "")
	err := p.run(ctx)
	if err != nil {
		p.set(ctx, pool.Failed, err.Error())
	}
	_ = workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) })
	return p.h, nil
}

type poolWF struct {
	spec     pool.Spec
	h        pool.Health
	draining bool
	deadline time.Duration // drain: how long in-flight generations may run
	wake     workflow.Channel
}

func (p *poolWF) onDrain(ctx workflow.Context, r pool.DrainRequest) (pool.Health, error) {
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

func (p *poolWF) onNode(ctx workflow.Context, o workflow.ActivityOptions) workflow.Context {
	o.TaskQueue = node.TaskQueue(p.spec.NodeID)
	return workflow.WithActivityOptions(ctx, o)
}

func (p *poolWF) run(ctx workflow.Context) error {
	var ca *activities.CatalogActivities
	var entry model.Entry
	if err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: time.Minute,
	}), ca.Entry, p.spec.ModelID).Get(ctx, &entry); err != nil {
		return err
	}
	var sc *activities.StagingControl
	if err := workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: StageDeadline, HeartbeatTimeout: 30 * time.Second,
		Summary: fmt.Sprintf("stage %s onto %s (starts or joins %s)", entry.ID, p.spec.NodeID, model.StageWorkflowID(p.spec.NodeID, entry.SHA256)),
	}), sc.EnsureStaged, model.StageRequest{NodeID: p.spec.NodeID, Entry: entry}).Get(ctx, nil); err != nil {
		return err
	}
	var ea *activities.EngineActivities
	if err := workflow.ExecuteActivity(p.onNode(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: time.Minute,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 3},
		Summary:             "memory preflight for " + entry.ID,
	}), ea.Preflight, activities.PreflightInput{Spec: p.spec, SHA256: entry.SHA256}).Get(ctx, nil); err != nil {
		return err
	}

	failures := 0
	backoff := pool.BackoffInitial
	for !p.draining {
		p.h.Epoch++
		var h pool.Handoff
		err := workflow.ExecuteActivity(p.onNode(ctx, workflow.ActivityOptions{
			StartToCloseTimeout: 10 * time.Minute, HeartbeatTimeout: 30 * time.Second,
			RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1},
			Summary:     fmt.Sprintf("start %s engine for %s, epoch %d", p.spec.Engine, p.spec.PoolID, p.h.Epoch),
		}), ea.StartEngine, activities.StartInput{Spec: p.spec, SHA256: entry.SHA256, Epoch: p.h.Epoch}).Get(ctx, &h)
		if err == nil {
			p.h.URL, p.h.PID, p.h.EngineVersion, p.h.SlotsTotal, p.h.SlotsFree = h.URL, h.PID, h.EngineVersion, h.Slots, h.Slots
			p.h.ReadyAt = workflow.Now(ctx)
			p.set(ctx, pool.Ready, "")
			var res activities.SuperviseResult
			res, err = p.supervise(ctx, ea, h)
			if p.draining {
				break
			}
			if err == nil {
				err = errors.New(res.Reason + lastLines(res.LogTail))
				if time.Duration(res.UptimeMs)*time.Millisecond >= pool.StableAfter {
					failures, backoff = 0, pool.BackoffInitial // it ran long enough: a fresh budget
				}
			}
		}
		if p.draining {
			break
		}
		p.h.SlotsFree = 0
		reason := err.Error()
		if nodeLost(err) {
			reason = "NODE_OFFLINE: lost contact with node " + p.spec.NodeID + " (" + reason + ")"
		} else {
			failures++
		}
		if failures >= pool.MaxConsecutiveFailures {
			return fmt.Errorf("circuit open after %d consecutive failures; last: %v", failures, err)
		}
		p.h.Restarts++
		p.set(ctx, pool.Unready, reason)
		// Jitter comes from a side effect so replay sees the same value.
		var jitter float64
		_ = workflow.SideEffect(ctx, func(workflow.Context) any { return rand.Float64() }).Get(&jitter)
		wait := backoff/2 + time.Duration(jitter*float64(backoff/2))
		backoff = min(2*backoff, pool.BackoffMax)
		timer := workflow.NewTimer(ctx, wait)
		sel := workflow.NewSelector(ctx)
		sel.AddFuture(timer, func(workflow.Future) {})
		sel.AddReceive(p.wake, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil) })
		sel.Select(ctx)
	}
	p.set(ctx, pool.Stopped, "")
	return nil
}

// supervise runs the engine's supervisor until the engine ends or a drain
// cancels it (the supervisor then stops the engine and removes the handoff).
func (p *poolWF) supervise(ctx workflow.Context, ea *activities.EngineActivities, h pool.Handoff) (activities.SuperviseResult, error) {
	sctx, cancel := workflow.WithCancel(ctx)
	defer cancel()
	f := workflow.ExecuteActivity(p.onNode(sctx, workflow.ActivityOptions{
		StartToCloseTimeout: 365 * 24 * time.Hour, HeartbeatTimeout: 15 * time.Second,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 1},
		WaitForCancellation: true,
		Summary:             fmt.Sprintf("supervise %s (pid %d, epoch %d)", h.URL, h.PID, h.Epoch),
	}), ea.Supervise, activities.SuperviseInput{PoolID: p.spec.PoolID, Epoch: h.Epoch, URL: h.URL, PID: h.PID})
	var res activities.SuperviseResult
	var err error
	sel := workflow.NewSelector(ctx)
	sel.AddFuture(f, func(f workflow.Future) { err = f.Get(ctx, &res) })
	sel.AddReceive(p.wake, func(c workflow.ReceiveChannel, _ bool) {
		c.Receive(ctx, nil)
		// Runs recorded before drains waited for in-flight work replay as
		// they ran.
		v := workflow.GetVersion(ctx, "drain-waits-for-in-flight", workflow.DefaultVersion, 1)
		if v >= 1 && p.deadline > 0 {
			// Let in-flight generations finish, up to the deadline.
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
		cancel()
		_ = f.Get(ctx, &res) // waits: the supervisor stops the engine
	})
	sel.Select(ctx)
	return res, err
}

// nodeLost says the failure is the node's (heartbeat lost), not the
// engine's: it does not count toward the circuit.
func nodeLost(err error) bool {
	var timeout *temporal.TimeoutError
	return errors.As(err, &timeout) && timeout.TimeoutType() == enumspb.TIMEOUT_TYPE_HEARTBEAT
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
	_ = workflow.UpsertTypedSearchAttributes(ctx, pool.PoolIDKey.ValueSet(p.spec.PoolID),
		node.NodeIDKey.ValueSet(p.spec.NodeID), model.ModelIDKey.ValueSet(p.spec.ModelID))
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**%s** pool %s on %s, model %s, %s engine\n\nurl %s, pid %d, epoch %d, restarts %d\n\n%s",
		p.h.State, p.spec.PoolID, p.spec.NodeID, p.spec.ModelID, p.spec.Engine, p.h.URL, p.h.PID, p.h.Epoch, p.h.Restarts, p.h.LastError))
}
