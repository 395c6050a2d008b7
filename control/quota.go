package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/task"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Quotas is the client side of the per-key quota workflows: admit a task
// under its key's limits, release one that did not start, read a key's
// usage. Every replica admits through the same workflow, so no two
// overspend a key.
type Quotas struct {
	Temporal client.Client
	Metrics  *QuotaMetrics // nil: not counted
	// SweepAfter is the quota workflows' sweep age and period, given to
	// each it starts (0: quota.DefaultSweepAfter; tests shorten it).
	SweepAfter time.Duration
}

// start is how a key's quota workflow is started where none runs: by an
// admission (update-with-start) or by an unadmitted task's report
// (signal-with-start).
func (q *Quotas) start(keyID string) (client.StartWorkflowOptions, quota.Input) {
	return client.StartWorkflowOptions{
		ID: quota.WorkflowID(keyID), TaskQueue: node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		StaticSummary:            "quota of API key " + keyID,
	}, quota.Input{KeyID: keyID, SweepAfter: q.SweepAfter}
}

// QuotaMetrics are the per-key figures: requests and refusals where the
// admission was decided (the replica that asked: once per request), tokens
// where the quota workflow applied the task's release (once per task; see
// workflows.Quotas); the requests of a key without limits where its tasks'
// reports were applied (once per task). Their key_id labels are bounded by
// the number of keys.
type QuotaMetrics struct {
	requests, refusals, tokensIn, tokensOut *prometheus.CounterVec
	admit                                   prometheus.Histogram
}

// NewQuotaMetrics registers the quota metrics on reg.
func NewQuotaMetrics(reg prometheus.Registerer) *QuotaMetrics {
	f := promauto.With(reg)
	return &QuotaMetrics{
		requests: f.NewCounterVec(prometheus.CounterOpts{Name: "llorch_key_requests_total",
			Help: "Tasks admitted under a key's quota, counted by the replica that asked."}, []string{"key_id"}),
		refusals: f.NewCounterVec(prometheus.CounterOpts{Name: "llorch_key_refusals_total",
			Help: "Tasks refused by a key's quota (429 QUOTA_EXCEEDED), by the limit met."}, []string{"key_id", "limit"}),
		tokensIn: f.NewCounterVec(prometheus.CounterOpts{Name: "llorch_key_tokens_in_total",
			Help: "Prompt tokens of a key's ended tasks, counted once where its quota workflow applied the release."}, []string{"key_id"}),
		tokensOut: f.NewCounterVec(prometheus.CounterOpts{Name: "llorch_key_tokens_out_total",
			Help: "Tokens produced by a key's ended tasks, counted once where its quota workflow applied the release."}, []string{"key_id"}),
		admit: f.NewHistogram(prometheus.HistogramOpts{Name: "llorch_quota_admit_seconds",
			Help:    "How long a quota admission takes (the update round trip to the key's quota workflow).",
			Buckets: []float64{.002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5}}),
	}
}

// Released counts a released task's tokens, and the request of an
// unadmitted one (a key without limits: no admission counted it); the
// quota workflows' hook.
func (m *QuotaMetrics) Released(keyID string, r quota.Release) {
	if m == nil {
		return
	}
	if r.Unadmitted {
		m.requests.WithLabelValues(keyID).Inc()
	}
	m.tokensIn.WithLabelValues(keyID).Add(float64(max(r.TokensIn, 0)))
	m.tokensOut.WithLabelValues(keyID).Add(float64(max(r.TokensOut, 0)))
}

// ExceededError is an admission a key's quota refused: which limit, and
// when its window frees a unit.
type ExceededError struct {
	KeyID string
	quota.Refusal
}

func (e *ExceededError) Error() string {
	return fmt.Sprintf("key %s: %s limit of %d reached (%d used)", e.KeyID, e.Limit, e.Allowed, e.Used)
}

// RetryAfter is when the refused admission may succeed.
func (e *ExceededError) RetryAfter() time.Duration {
	return time.Duration(e.RetryAfterMs) * time.Millisecond
}

// Admit takes a unit of key keyID's limits for task taskID, starting the
// key's quota workflow if none runs (update-with-start): an
// *ExceededError when a limit is reached. New is false when the task was
// admitted already (a retry): only a new admission is released after a
// failed start.
func (q *Quotas) Admit(ctx context.Context, keyID, taskID string, l apikey.Limits) (isNew bool, err error) {
	start := time.Now()
	var r quota.AdmitResult
	opts, in := q.start(keyID)
	err = updateWithStart(ctx, q.Temporal, opts, quota.WorkflowType, in, quota.UpdateAdmit,
		quota.AdmitRequest{TaskID: taskID, Limits: l}, &r)
	if q.Metrics != nil {
		q.Metrics.admit.Observe(time.Since(start).Seconds())
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) && app.Type() == quota.ErrExceeded {
		e := &ExceededError{KeyID: keyID}
		if app.HasDetails() {
			_ = app.Details(&e.Refusal)
		}
		if q.Metrics != nil {
			q.Metrics.refusals.WithLabelValues(keyID, e.Limit).Inc()
		}
		return false, e
	}
	if err != nil {
		return false, fmt.Errorf("quota of key %s: admit task %s: %w", keyID, taskID, err)
	}
	if q.Metrics != nil && r.New {
		q.Metrics.requests.WithLabelValues(keyID).Inc()
	}
	return r.New, nil
}

// Release ends the admission of a task whose workflow did not start (a
// started one releases itself when it ends).
func (q *Quotas) Release(ctx context.Context, keyID, taskID string) error {
	err := q.Temporal.SignalWorkflow(ctx, quota.WorkflowID(keyID), "", quota.SignalRelease, quota.Release{TaskID: taskID})
	if err != nil {
		return fmt.Errorf("quota of key %s: release task %s: %w", keyID, taskID, err)
	}
	return nil
}

// Report counts the end of a task of a key without limits (r.Unadmitted),
// starting the key's quota workflow where none runs (signal-with-start):
// the task workflow's local activity at its end. A repeated report counts
// once (quota.State.Reported).
func (q *Quotas) Report(ctx context.Context, keyID string, r quota.Release) error {
	opts, in := q.start(keyID)
	if _, err := q.Temporal.SignalWithStartWorkflow(ctx, opts.ID, quota.SignalRelease, r, opts, quota.WorkflowType, in); err != nil {
		return fmt.Errorf("quota of key %s: report task %s: %w", keyID, r.TaskID, err)
	}
	return nil
}

// Running says which of the tasks have a running workflow (task:<id>):
// the quota sweep releases the rest (never started, or ended without a
// release: terminated by hand). A task whose workflow cannot be described
// now counts as running, so a Temporal hiccup frees nothing; err is the
// last such failure when none could be described.
func (q *Quotas) Running(ctx context.Context, taskIDs []string) (running []string, err error) {
	failed := 0
	for _, id := range taskIDs {
		d, derr := q.Temporal.DescribeWorkflowExecution(ctx, task.WorkflowID(id), "")
		var nf *serviceerror.NotFound
		switch {
		case errors.As(derr, &nf):
		case derr != nil:
			failed++
			err = fmt.Errorf("describe task %s: %w", id, derr)
			running = append(running, id)
		case d.GetWorkflowExecutionInfo().GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
			running = append(running, id)
		}
	}
	if failed < len(taskIDs) {
		err = nil
	}
	return running, err
}

// Usage reads key keyID's figures now; a key that was never metered (no
// quota workflow) has zero figures and Metered false.
func (q *Quotas) Usage(ctx context.Context, keyID string) (quota.Usage, error) {
	var st quota.State
	v, err := q.Temporal.QueryWorkflow(ctx, quota.WorkflowID(keyID), "", quota.QueryState)
	if err == nil {
		err = v.Get(&st)
	}
	now := time.Now().UTC()
	if errors.Is(notFound(err, ErrQuotaNotFound), ErrQuotaNotFound) {
		return quota.Usage{KeyID: keyID, At: now}, nil
	}
	if err != nil {
		return quota.Usage{}, fmt.Errorf("quota of key %s: %w", keyID, err)
	}
	// The window is the reader's now, not the workflow's last task time.
	return st.Usage(now), nil
}
