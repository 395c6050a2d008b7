package activities

import (
	"context"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/quota"
)

// QuotaControl are the quota steps that reach Temporal, on the control
// queue: a task's report at its end (a local activity of the task
// workflow) and the quota workflow's sweep of admissions whose task may be
// gone.
type QuotaControl struct {
	Quotas *control.Quotas
}

// QuotaReport is the end of a task of a key without limits.
type QuotaReport struct {
	KeyID   string        `json:"key_id"`
	Release quota.Release `json:"release"`
}

// ReportUsage counts the task's request and tokens in its key's quota
// workflow, starting it where none runs.
func (a *QuotaControl) ReportUsage(ctx context.Context, r QuotaReport) error {
	return a.Quotas.Report(ctx, r.KeyID, r.Release)
}

// RunningTasks returns which of the tasks still have a running workflow.
func (a *QuotaControl) RunningTasks(ctx context.Context, taskIDs []string) ([]string, error) {
	return a.Quotas.Running(ctx, taskIDs)
}
