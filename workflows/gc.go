package workflows

import (
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// GC frees a node's model disk: it plans on the node, then deletes one file
// per activity so each deletion, with its reason, is an event in history.
func GC(ctx workflow.Context, in model.GCInput) (model.GCResult, error) {
	res := model.GCResult{DryRun: in.DryRun}
	control := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue: node.ControlTaskQueue, StartToCloseTimeout: time.Minute,
		RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 3},
	})
	// A node that does not answer within a minute is not collected now;
	// the next scheduled run tries again.
	onNode := func(summary string) workflow.Context {
		return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
			TaskQueue: node.TaskQueue(in.NodeID), ScheduleToStartTimeout: time.Minute, StartToCloseTimeout: time.Minute,
			RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 3, NonRetryableErrorTypes: []string{model.ErrInUse}},
			Summary:     summary,
		})
	}
	var ca *activities.CatalogActivities
	var catalog activities.CatalogDigests
	if err := workflow.ExecuteActivity(control, ca.Digests).Get(ctx, &catalog); err != nil {
		return res, err
	}
	var ga *activities.GCActivities
	err := workflow.ExecuteActivity(onNode("plan GC on "+in.NodeID), ga.PlanGC, activities.PlanGCInput{
		NodeID: in.NodeID, Policy: in.Policy, InUse: in.InUse, Catalog: catalog,
	}).Get(ctx, &res.Plan)
	if err != nil {
		return res, err
	}
	p := res.Plan
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**plan** usage %d of budget %d bytes (high %d, low %d): %d evictions%s",
		p.UsageBytes, p.BudgetBytes, p.HighBytes, p.LowBytes, len(p.Evictions), map[bool]string{true: " (dry run)"}[in.DryRun]))
	if in.DryRun {
		return res, nil
	}
	for _, e := range p.Evictions {
		summary := fmt.Sprintf("evict %s %s (%s, %d bytes)", e.Kind, nameOf(e), e.Reason, e.Bytes)
		err := workflow.ExecuteActivity(onNode(summary), ga.Evict, activities.EvictInput{NodeID: in.NodeID, Eviction: e}).Get(ctx, nil)
		var appErr *temporal.ApplicationError
		if err != nil && !(errors.As(err, &appErr) && appErr.Type() == model.ErrInUse) {
			return res, err // an in-use model is skipped; anything else stops GC
		}
		if err == nil {
			res.Evicted = append(res.Evicted, e)
		}
	}
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**done** evicted %d of %d planned; usage now about %d bytes (low watermark %d)",
		len(res.Evicted), len(p.Evictions), p.UsageAfter, p.LowBytes))
	return res, nil
}

func nameOf(e model.Eviction) string {
	if e.ModelID != "" {
		return e.ModelID
	}
	return e.SHA256[:min(len(e.SHA256), 12)]
}
