package workflows

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
)

// Generation timings of a task.
const (
	// taskHeartbeat: a generating node silent this long is lost; the task
	// moves to another pool.
	taskHeartbeat = 5 * time.Second
	taskMaxTime   = 24 * time.Hour
	// maxMigrations bounds how often one task moves off lost nodes.
	maxMigrations = 3
	// lostPoolGrace: with no other pool, how long a moved task waits for
	// the lost one to come back before it fails with WORKER_RESET.
	lostPoolGrace = 45 * time.Second
	// maxRefusals bounds how often a task is placed again after a node
	// refused its slot claim (the replica's view lagged the node: an
	// engine just gone, a worker just restarted); refusedBackoff is the
	// first wait before placing again, doubling up to 2 s.
	maxRefusals    = 8
	refusedBackoff = 100 * time.Millisecond
)

// Task runs one inference task: a slot from the scheduler, the generation on
// that pool's node (tokens travel out of band, never through this
// history), and, when the node is lost mid-stream, the rest of the
// generation on another pool from the tokens already produced. It records
// the outcome: text, token counts, timings, migrations.
func Task(ctx workflow.Context, req task.Request) (task.Status, error) {
	t := &taskWF{req: req, cancel: workflow.GetSignalChannel(ctx, task.SignalCancel)}
	t.st = task.Status{TaskID: req.TaskID, State: task.Queued, ModelID: req.ModelID,
		CorrelationID: req.CorrelationID, Owner: req.Owner, SubmittedAt: workflow.Now(ctx)}
	if err := workflow.SetQueryHandler(ctx, task.QueryStatus, func() (task.Status, error) { return t.st, nil }); err != nil {
		return t.st, err
	}
	t.details(ctx)

	gctx, stop := workflow.WithCancel(ctx)
	var runErr error
	finished := workflow.NewBufferedChannel(ctx, 1)
	workflow.Go(gctx, func(c workflow.Context) {
		runErr = t.run(c)
		finished.SendAsync(true)
	})
	ended := false
	sel := workflow.NewSelector(ctx)
	sel.AddReceive(finished, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil); ended = true })
	sel.AddReceive(t.cancel, func(c workflow.ReceiveChannel, _ bool) {
		var r task.Cancel // or the bare reason of an older signal
		c.Receive(ctx, &r)
		recordActor(ctx, r.Actor, "cancel")
		t.fail(task.Canceled, &task.Error{Code: task.ErrCanceled, Message: "canceled" + suffix(r.Reason)})
	})
	if req.Deadline > 0 {
		left := req.Deadline - workflow.Now(ctx).Sub(req.EnqueuedAt)
		sel.AddFuture(workflow.NewTimer(gctx, max(left, time.Millisecond)), func(workflow.Future) {
			t.fail(task.Failed, &task.Error{Code: task.ErrDeadline,
				Message: fmt.Sprintf("deadline of %s passed after %d tokens", req.Deadline, len(t.prog.Tokens))})
		})
	}
	sel.Select(ctx)
	if !ended {
		stop() // cancels the generation on the node; the run then returns
		finished.Receive(ctx, nil)
	}
	if t.st.Error == nil && runErr != nil {
		t.fail(task.Failed, asTaskError(runErr))
	}
	t.takeSeen(ctx) // late reports of what readers saw: nothing to resume now
	t.st.FinishedAt = workflow.Now(ctx)
	t.details(ctx)
	// Lists filter on the end state (GET /v2/tasks): in the namespace's
	// TaskState, where it has the attribute (req.Indexed).
	if req.Indexed && workflow.GetVersion(ctx, "task-state-attribute", workflow.DefaultVersion, 1) >= 1 {
		if err := workflow.UpsertTypedSearchAttributes(ctx, task.StateKey.ValueSet(string(t.st.State))); err != nil {
			workflow.GetLogger(ctx).Warn("task state not recorded for lists", "err", err)
		}
	}
	var tc *scheduler.TaskControl
	_ = t.controlStep(ctx, tc.Finished, scheduler.FinishInput{TaskID: req.TaskID, State: t.st.State, Code: errCode(t.st.Error)})
	t.releaseQuota(ctx)
	return t.st, nil
}

// releaseQuota tells the key's quota workflow the task ended, with its
// tokens, so its unit of concurrency frees even when the replica that
// admitted it is gone. A task admitted under limits (QuotaKey) signals its
// key's quota workflow, which its admission started. A task of a key
// without limits made no admission: since "quota-usage" it reports its end
// (request and tokens) with a local activity that signal-with-starts the
// key's quota workflow, so every key's usage is metered. The bootstrap
// key's tasks, tasks of an older release (no Owner) and runs recorded
// before those versions send nothing.
func (t *taskWF) releaseQuota(ctx workflow.Context) {
	// A canceled run still releases.
	dctx, _ := workflow.NewDisconnectedContext(ctx)
	out := max(t.st.TokensOut, len(t.prog.Tokens))
	r := quota.Release{TaskID: t.req.TaskID, TokensIn: t.st.TokensIn, TokensOut: out}
	key := t.req.QuotaKey
	var err error
	switch {
	case key != "":
		if workflow.GetVersion(ctx, "quota-release", workflow.DefaultVersion, 1) < 1 {
			return
		}
		err = workflow.SignalExternalWorkflow(dctx, quota.WorkflowID(key), "", quota.SignalRelease, r).Get(dctx, nil)
	case t.req.Owner != "" && t.req.Owner != apikey.BootstrapID:
		if workflow.GetVersion(ctx, "quota-usage", workflow.DefaultVersion, 1) < 1 {
			return
		}
		key, r.Unadmitted = t.req.Owner, true
		lctx := workflow.WithLocalActivityOptions(dctx, workflow.LocalActivityOptions{StartToCloseTimeout: 10 * time.Second,
			RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumAttempts: 5}})
		var qa *activities.QuotaControl
		err = workflow.ExecuteLocalActivity(lctx, qa.ReportUsage, activities.QuotaReport{KeyID: key, Release: r}).Get(dctx, nil)
	default:
		return
	}
	if err != nil {
		// The key's quota workflow is gone (terminated), or Temporal did
		// not take the report: the task's usage goes uncounted.
		workflow.GetLogger(ctx).Warn("quota release not delivered", "task_id", t.req.TaskID, "key_id", key,
			"correlation_id", t.req.CorrelationID, "err", err)
	}
}

type taskWF struct {
	req    task.Request
	st     task.Status
	prog   task.Progress
	cancel workflow.ReceiveChannel
}

func (t *taskWF) control(ctx workflow.Context, timeout time.Duration) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: timeout,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 10 * time.Second},
	})
}

// controlStep runs a short step of the apiserver's (Release, Finished): a
// local activity, no server round trip, for tasks started since
// "control-steps-local"; tasks recorded before replay as they ran.
func (t *taskWF) controlStep(ctx workflow.Context, fn, arg any) error {
	if workflow.GetVersion(ctx, "control-steps-local", workflow.DefaultVersion, 1) >= 1 {
		lctx := workflow.WithLocalActivityOptions(ctx, workflow.LocalActivityOptions{StartToCloseTimeout: 10 * time.Second,
			RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumAttempts: 5}})
		return workflow.ExecuteLocalActivity(lctx, fn, arg).Get(ctx, nil)
	}
	return workflow.ExecuteActivity(t.control(ctx, time.Minute), fn, arg).Get(ctx, nil)
}

func (t *taskWF) fail(s task.State, e *task.Error) {
	if t.st.Error == nil && t.st.State != task.Completed {
		t.st.State, t.st.Error = s, e
	}
}

func (t *taskWF) run(ctx workflow.Context) error {
	var tc *scheduler.TaskControl
	var ga *activities.GenerateActivities
	var exclude []string
	refusals := 0
	// The admitting replica sent the first generation to its slot's node
	// ahead of this workflow: it runs there (tasks recorded before
	// "fast-start" replay as they ran).
	fast := t.req.FastStart != nil
	for {
		// A slot. The scheduler lives in the apiserver: a restarted one is
		// back for the retried activity after the heartbeat timeout.
		pctx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
			TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: taskMaxTime, HeartbeatTimeout: 10 * time.Second,
			RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 5 * time.Second,
				NonRetryableErrorTypes: []string{task.ErrPoolUnavailable}},
			Summary: "wait for a slot of a pool serving " + t.req.ModelID,
		})
		var where task.Where
		var err error
		var g scheduler.Granted
		attach := false
		if fast && workflow.GetVersion(ctx, "fast-start", workflow.DefaultVersion, 1) >= 1 {
			g, attach = scheduler.Granted{Where: *t.req.FastStart, OK: true}, true
		} else if len(exclude) == 0 && workflow.GetVersion(ctx, "try-place-locally", workflow.DefaultVersion, 1) >= 1 {
			// Most tasks were given a slot at admission: a local activity
			// reads it without a server round trip (tasks recorded before
			// replay as they ran).
			lctx := workflow.WithLocalActivityOptions(ctx, workflow.LocalActivityOptions{StartToCloseTimeout: 5 * time.Second})
			if workflow.ExecuteLocalActivity(lctx, tc.TryPlace, t.req.TaskID).Get(ctx, &g) != nil {
				g.OK = false
			}
		}
		// A moved task goes on where a slot holds its prompt and all it
		// may generate: a smaller one would end it early at the limit.
		pl := t.req.Placement
		if len(exclude) > 0 && t.prog.TokensIn > 0 {
			pl.MinCtx = max(pl.MinCtx, t.prog.TokensIn+t.req.Params.MaxTokens)
		}
		if g.OK {
			where = g.Where
		} else {
			in := scheduler.PlaceInput{TaskID: t.req.TaskID, ModelID: t.req.ModelID,
				Priority: t.req.Priority, Placement: pl, Exclude: exclude, EnqueuedAt: t.req.EnqueuedAt}
			if len(exclude) == 0 { // a moved task decodes its whole prompt again: no cache to find
				in.Prefix = prefix.Of(t.req)
			}
			err = workflow.ExecuteActivity(pctx, tc.Place, in).Get(ctx, &where)
		}
		// No other pool: the lost one may come back (a Temporal outage or a
		// network blip looks like a lost node too). Wait for any pool, the
		// lost one included, for a while before giving up (tasks recorded
		// before this replay as they ran).
		if err != nil && len(exclude) > 0 && isType(err, task.ErrPoolUnavailable) &&
			workflow.GetVersion(ctx, "lost-pool-may-return", workflow.DefaultVersion, 1) >= 1 {
			err = workflow.ExecuteActivity(pctx, tc.Place, scheduler.PlaceInput{TaskID: t.req.TaskID, ModelID: t.req.ModelID,
				Priority: t.req.Priority, Placement: pl, EnqueuedAt: t.req.EnqueuedAt,
				NoPoolGrace: lostPoolGrace}).Get(ctx, &where)
		}
		if err != nil {
			if len(t.st.Migrations) > 0 && isType(err, task.ErrPoolUnavailable) {
				return &taskError{task.Error{Code: task.ErrWorkerReset, Retriable: true, RetryAfterMs: 1000,
					Message: fmt.Sprintf("the node generating this task was lost after %d tokens and no other pool can continue it", len(t.prog.Tokens))}}
			}
			return err
		}
		if len(t.st.Migrations) > 0 {
			t.st.Migrations[len(t.st.Migrations)-1].To = where
		} else {
			t.st.QueueMs = workflow.Now(ctx).Sub(t.req.EnqueuedAt).Milliseconds()
		}
		t.st.State, t.st.Where = task.Running, &where
		t.details(ctx)

		began := workflow.Now(ctx)
		gctx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
			TaskQueue: node.TaskQueue(where.NodeID), StartToCloseTimeout: taskMaxTime,
			ScheduleToStartTimeout: time.Minute, HeartbeatTimeout: taskHeartbeat,
			RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 1},
			WaitForCancellation: true,
			Summary:             fmt.Sprintf("generate on %s/%s from token %d", where.NodeID, where.PoolID, len(t.prog.Tokens)),
		})
		var res task.Result
		err = workflow.ExecuteActivity(gctx, ga.Generate, activities.GenerateInput{Request: t.req, Where: where, Resume: t.prog, Attach: attach}).Get(ctx, &res)
		fast = false
		// The slot goes back whatever happened (on a context that a cancel
		// does not stop).
		rctx, _ := workflow.NewDisconnectedContext(ctx)
		_ = t.controlStep(rctx, tc.Release, scheduler.ReleaseInput{
			TaskID: t.req.TaskID, PoolID: where.PoolID, BusyMs: workflow.Now(ctx).Sub(began).Milliseconds() - res.WaitMs})
		if err == nil {
			t.done(res)
			return nil
		}
		// The node refused the claim (a new error: recorded runs never
		// took this branch): place the task again, the same pool allowed,
		// after a backoff; no migration.
		if ctx.Err() == nil && isType(err, task.ErrSlotRefused) {
			if refusals++; refusals > maxRefusals {
				return &taskError{task.Error{Code: task.ErrPoolUnavailable, Retriable: true, RetryAfterMs: 1000,
					Message: fmt.Sprintf("nodes refused this task's slot %d times; last: %v", refusals-1, err)}}
			}
			t.st.State = task.Queued
			workflow.GetLogger(ctx).Info("node refused the slot; placing the task again", "task_id", t.req.TaskID,
				"node_id", where.NodeID, "pool_id", where.PoolID, "refusals", refusals, "correlation_id", t.req.CorrelationID)
			if workflow.Sleep(ctx, min(refusedBackoff<<(refusals-1), 2*time.Second)) != nil {
				return ctx.Err()
			}
			continue
		}
		if ctx.Err() != nil || !lostNode(err) {
			return err
		}
		// The node is lost: continue from what was produced, elsewhere.
		t.recoverProgress(ctx, err)
		if len(t.st.Migrations) >= maxMigrations {
			return &taskError{task.Error{Code: task.ErrWorkerReset, Retriable: true, RetryAfterMs: 1000,
				Message: fmt.Sprintf("lost %d nodes while generating; giving up", len(t.st.Migrations))}}
		}
		t.st.Migrations = append(t.st.Migrations, task.Migration{From: where, AtToken: len(t.prog.Tokens),
			Reason: err.Error(), At: workflow.Now(ctx)})
		exclude = append(exclude, where.PoolID)
		t.st.State = task.Queued
		workflow.GetLogger(ctx).Warn("generating node lost; moving the task", "task_id", t.req.TaskID,
			"node_id", where.NodeID, "pool_id", where.PoolID, "at_token", len(t.prog.Tokens), "correlation_id", t.req.CorrelationID)
	}
}

// recoverProgress takes the longest of the lost generation's last
// heartbeat, the tokens its error carries (its worker outlived the
// engine), what replicas' readers had when the node's link broke off
// (SignalSeen), and what the answering apiserver's stream holds.
func (t *taskWF) recoverProgress(ctx workflow.Context, err error) {
	tokensIn := t.prog.TokensIn // the prompt's length, whichever source told
	defer func() { t.prog.TokensIn = max(t.prog.TokensIn, tokensIn) }()
	var timeout *temporal.TimeoutError
	if errors.As(err, &timeout) && timeout.HasLastHeartbeatDetails() {
		var p task.Progress
		if timeout.LastHeartbeatDetails(&p) == nil {
			tokensIn = max(tokensIn, p.TokensIn)
			if len(p.Tokens) > len(t.prog.Tokens) {
				t.prog = p
			}
		}
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) && app.Type() == task.ErrWorkerReset && app.HasDetails() {
		var p task.Progress
		if app.Details(&p) == nil {
			tokensIn = max(tokensIn, p.TokensIn)
			if len(p.Tokens) > len(t.prog.Tokens) && len(p.Tokens) == len(p.Pieces) {
				t.prog = p
			}
		}
	}
	t.takeSeen(ctx)
	var tc *scheduler.TaskControl
	var p task.Progress
	if workflow.ExecuteActivity(t.control(ctx, 30*time.Second), tc.StreamProgress, t.req.TaskID).Get(ctx, &p) == nil &&
		len(p.Tokens) > len(t.prog.Tokens) && len(p.Tokens) == len(p.Pieces) {
		t.prog = p
	}
}

// takeSeen applies the readers' progress replicas signaled (SignalSeen).
// Signals carry no command: recorded runs replay as they ran.
func (t *taskWF) takeSeen(ctx workflow.Context) {
	seen := workflow.GetSignalChannel(ctx, task.SignalSeen)
	for {
		var p task.Progress
		if !seen.ReceiveAsync(&p) {
			return
		}
		if len(p.Tokens) > len(t.prog.Tokens) && len(p.Tokens) == len(p.Pieces) {
			t.prog = p
		}
	}
}

func (t *taskWF) done(res task.Result) {
	t.prog = task.Progress{Tokens: res.Tokens, Pieces: res.Pieces}
	t.st.State = task.Completed
	t.st.Text = strings.Join(res.Pieces, "")
	t.st.Pieces = res.Pieces
	t.st.TokensIn, t.st.TokensOut, t.st.TokensCached = res.TokensIn, len(res.Tokens), res.TokensCached
	if res.Output != nil {
		// The output is in the bucket: the status (query and result) holds
		// its reference, and readers fetch it (control.Tasks). State only,
		// no command: recorded runs replay as they ran.
		t.st.Output, t.st.TokensOut = res.Output, res.Output.Tokens
	}
	t.st.StopType = res.StopType
	if len(t.st.Migrations) == 0 {
		t.st.FirstTokenMs = res.FirstTokenMs
		t.st.QueueMs += res.WaitMs // the wait at the node for a slot
	}
	t.st.DecodeMs += res.DecodeMs
}

func (t *taskWF) details(ctx workflow.Context) {
	where := "-"
	if w := t.st.Where; w != nil {
		where = w.NodeID + "/" + w.PoolID
	}
	errText := ""
	if e := t.st.Error; e != nil {
		errText = "\n\n" + e.Code + ": " + e.Message
	}
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**%s** task %s, model %s, on %s\n\ntokens in %d, out %d, migrations %d%s",
		t.st.State, t.req.TaskID, t.req.ModelID, where, t.st.TokensIn, t.st.TokensOut, len(t.st.Migrations), errText))
}

// lostNode: the generating node went silent, or its engine broke off.
func lostNode(err error) bool {
	var timeout *temporal.TimeoutError
	if errors.As(err, &timeout) {
		return timeout.TimeoutType() != 0
	}
	return isType(err, task.ErrWorkerReset)
}

func isType(err error, typ string) bool {
	var app *temporal.ApplicationError
	return errors.As(err, &app) && app.Type() == typ
}

// taskError is a failure with its API shape.
type taskError struct{ e task.Error }

func (e *taskError) Error() string { return e.e.Code + ": " + e.e.Message }

func asTaskError(err error) *task.Error {
	var te *taskError
	if errors.As(err, &te) {
		return &te.e
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		code := app.Type()
		retriable := code == task.ErrPoolUnavailable || code == task.ErrWorkerReset || code == task.ErrOutputUnstored
		e := &task.Error{Code: code, Message: app.Message(), Retriable: retriable}
		if retriable {
			e.RetryAfterMs = 1000
		}
		return e
	}
	return &task.Error{Code: task.ErrEngine, Message: err.Error()}
}

func errCode(e *task.Error) string {
	if e == nil {
		return ""
	}
	return e.Code
}

func suffix(reason string) string {
	if reason == "" {
		return ""
	}
	return ": " + reason
}
