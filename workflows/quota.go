package workflows

import (
	"fmt"
	"slices"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/quota"
)

// inFlightMax bounds how long an admission holds a unit of concurrency
// without its release: past a task's longest life (a day), an entry is a
// task that can no longer signal (terminated, or never started because its
// replica died between admission and start).
const inFlightMax = 25 * time.Hour

// Quotas runs the per-key quota workflows. Counted, when set, counts each
// release that changed the counters (its tokens; an unadmitted task's
// request) on the process whose worker first applies it (the hook is
// skipped on replay, so each release counts once across replicas, but for
// a workflow task that failed after applying it and was retried).
type Quotas struct {
	Counted func(keyID string, r quota.Release)
}

// Quota decides every admission of one key (quota:<key id>): requests per
// minute and tokens per minute over a sliding window of one-second
// buckets, and tasks in flight. Every replica admits through its admit
// update, so decisions are serial: two replicas racing cannot both take
// the last unit. A refusal is the validator's and leaves no history. A
// task's end (the task workflow's signal, or the apiserver's release of a
// task that failed to start) frees its unit and counts its tokens; the end
// of a task of a key without limits (never admitted) counts its request
// and tokens. While tasks are in flight a sweep asks, every SweepAfter,
// whether the tasks of admissions older than that still run, and releases
// those that do not (never started, or terminated by hand). The run
// continues as new with its counters before its history grows long.
func (q *Quotas) Quota(ctx workflow.Context, in quota.Input) (quota.State, error) {
	w := &quotaWF{q: q, st: quota.State{KeyID: in.KeyID}}
	if in.Carry != nil {
		w.st = *in.Carry
	}
	if err := workflow.SetQueryHandler(ctx, quota.QueryState, func() (quota.State, error) { return w.st, nil }); err != nil {
		return w.st, err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, quota.UpdateAdmit, w.admit,
		workflow.UpdateHandlerOptions{Validator: w.validate}); err != nil {
		return w.st, err
	}
	release := workflow.GetSignalChannel(ctx, quota.SignalRelease)
	w.details(ctx)
	// Runs recorded before "quota-sweep" had no sweep: their admissions
	// expire after inFlightMax only.
	if workflow.GetVersion(ctx, "quota-sweep", workflow.DefaultVersion, 1) >= 1 {
		after := in.SweepAfter
		if after <= 0 {
			after = quota.DefaultSweepAfter
		}
		workflow.Go(ctx, func(c workflow.Context) { w.sweep(c, release, after) })
	}
	for {
		if err := workflow.Await(ctx, func() bool { return release.Len() > 0 || w.shouldContinueAsNew(ctx, in) }); err != nil {
			return w.st, err
		}
		w.drain(ctx, release)
		if w.shouldContinueAsNew(ctx, in) {
			// Admissions accepted now finish in this run; releases that
			// came meanwhile are applied before the counters move on.
			if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
				return w.st, err
			}
			w.drain(ctx, release)
			w.st.Prune(workflow.Now(ctx))
			workflow.GetLogger(ctx).Info("quota continuing as new", "key_id", in.KeyID,
				"history_length", workflow.GetInfo(ctx).GetCurrentHistoryLength(), "in_flight", len(w.st.InFlight))
			carry := w.st
			return w.st, workflow.NewContinueAsNewError(ctx, quota.WorkflowType,
				quota.Input{KeyID: in.KeyID, Carry: &carry, MaxEvents: in.MaxEvents, SweepAfter: in.SweepAfter})
		}
	}
}

type quotaWF struct {
	q  *Quotas
	st quota.State
}

func (w *quotaWF) shouldContinueAsNew(ctx workflow.Context, in quota.Input) bool {
	info := workflow.GetInfo(ctx)
	limit := in.MaxEvents
	if limit <= 0 {
		limit = quota.DefaultMaxEvents
	}
	return info.GetContinueAsNewSuggested() || info.GetCurrentHistoryLength() >= limit
}

// validate refuses an admission over a limit before it is written to the
// history. A task admitted already is admitted again (a retry).
func (w *quotaWF) validate(ctx workflow.Context, r quota.AdmitRequest) error {
	if r.TaskID == "" {
		return temporal.NewNonRetryableApplicationError("an admission needs a task id", "INVALID_QUOTA_MESSAGE", nil)
	}
	if w.st.Holds(r.TaskID) {
		return nil
	}
	return w.refusal(w.st.Check(workflow.Now(ctx), r.Limits))
}

func (w *quotaWF) refusal(r *quota.Refusal) error {
	if r == nil {
		return nil
	}
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("key %s: %s limit %d reached (%d used); retry in %d ms", w.st.KeyID, r.Limit, r.Allowed, r.Used, r.RetryAfterMs),
		quota.ErrExceeded, nil, *r)
}

// admit takes a unit of each limit for the task. It decides again: the
// validator ran moments ago in the same workflow task, and nothing ran
// between (handlers do not block), but a refusal here is still a refusal.
func (w *quotaWF) admit(ctx workflow.Context, r quota.AdmitRequest) (quota.AdmitResult, error) {
	now := workflow.Now(ctx)
	w.expire(ctx, now)
	if !w.st.Holds(r.TaskID) {
		if err := w.refusal(w.st.Check(now, r.Limits)); err != nil {
			return quota.AdmitResult{}, err
		}
	}
	w.st.Prune(now)
	isNew := w.st.Admit(now, r.TaskID, r.Limits)
	w.details(ctx)
	return quota.AdmitResult{New: isNew}, nil
}

// expire drops admissions older than a task can live: their release can
// no longer come.
func (w *quotaWF) expire(ctx workflow.Context, now time.Time) {
	for _, id := range w.st.Expire(now.Add(-inFlightMax)) {
		workflow.GetLogger(ctx).Warn("quota: admission expired without a release", "key_id", w.st.KeyID, "task_id", id)
	}
}

// drain applies every release received.
func (w *quotaWF) drain(ctx workflow.Context, ch workflow.ReceiveChannel) {
	changed := false
	for {
		var r quota.Release
		if !ch.ReceiveAsync(&r) {
			break
		}
		now := workflow.Now(ctx)
		w.st.Prune(now)
		if !w.st.Release(now, r) {
			continue // released already (a failed start, then its workflow's end), or never admitted
		}
		changed = true
		if w.q.Counted != nil && !workflow.IsReplaying(ctx) {
			w.q.Counted(w.st.KeyID, r)
		}
	}
	if changed {
		w.details(ctx)
	}
}

// sweep releases the admissions whose task no longer runs, SweepBatch at a
// time, every after while tasks are in flight. An activity asks Temporal
// (task:<id> not found, or closed), so admissions go on meanwhile.
func (w *quotaWF) sweep(ctx workflow.Context, release workflow.ReceiveChannel, after time.Duration) {
	actx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: time.Minute,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, MaximumAttempts: 3},
	})
	var a *activities.QuotaControl
	for {
		if err := workflow.Await(ctx, func() bool { return len(w.st.InFlight) > 0 }); err != nil {
			return
		}
		if err := workflow.Sleep(ctx, after); err != nil {
			return
		}
		ids := w.st.Stale(workflow.Now(ctx), after, quota.SweepBatch)
		if len(ids) == 0 {
			continue
		}
		var running []string
		if err := workflow.ExecuteActivity(actx, a.RunningTasks, ids).Get(ctx, &running); err != nil {
			workflow.GetLogger(ctx).Warn("quota sweep: tasks not described; trying at the next sweep", "key_id", w.st.KeyID, "tasks", len(ids), "err", err)
			continue
		}
		// A task that ended normally signalled its release before its
		// workflow closed: apply it first, so its tokens count.
		w.drain(ctx, release)
		now := workflow.Now(ctx)
		w.st.Checked(now, running)
		for _, id := range ids {
			if slices.Contains(running, id) || !w.st.Release(now, quota.Release{TaskID: id}) {
				continue
			}
			workflow.GetLogger(ctx).Warn("quota: released an admission whose task is not running (never started, or terminated)",
				"key_id", w.st.KeyID, "task_id", id)
		}
		w.details(ctx)
	}
}

func (w *quotaWF) details(ctx workflow.Context) {
	l := w.st.Limits
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**key %s**: %d in flight; %d requests, %d tokens in, %d out in all\n\nlimits: %d requests/min, %d tokens/min, %d concurrent (0: none)",
		w.st.KeyID, len(w.st.InFlight), w.st.Requests, w.st.TokensIn, w.st.TokensOut, l.RequestsPerMinute, l.TokensPerMinute, l.ConcurrentTasks))
}
