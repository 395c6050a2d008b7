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

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// RunGC runs GC on a node now and waits for its result. A real run joins
// one already running (gc:<node>); a dry run has its own id so it never
// joins, or is mistaken for, one that deletes.
func (c *Models) RunGC(ctx context.Context, nodeID string, policy node.GCPolicy, dryRun bool, inUse []string) (model.GCResult, error) {
	id := model.GCWorkflowID(nodeID)
	if dryRun {
		id += ":dry-run"
	}
	run, err := c.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                       id,
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		TypedSearchAttributes:    temporal.NewSearchAttributes(node.NodeIDKey.ValueSet(nodeID)),
		StaticSummary:            fmt.Sprintf("GC of node %s%s", nodeID, map[bool]string{true: " (dry run)"}[dryRun]),
	}, model.GCWorkflowType, model.GCInput{NodeID: nodeID, Policy: policy, DryRun: dryRun, InUse: inUse})
	if err != nil {
		return model.GCResult{}, err
	}
	var res model.GCResult
	err = run.Get(ctx, &res)
	return res, err
}

// ScheduleGC creates, or updates, the Temporal Schedule gc:<node> that runs
// GC on the node every interval (overlaps skipped).
func (c *Models) ScheduleGC(ctx context.Context, nodeID string, policy node.GCPolicy, every time.Duration) error {
	id := model.GCWorkflowID(nodeID)
	spec := client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: every}}}
	action := &client.ScheduleWorkflowAction{
		ID: id, Workflow: model.GCWorkflowType, TaskQueue: node.ControlTaskQueue,
		Args:                  []any{model.GCInput{NodeID: nodeID, Policy: policy}},
		TypedSearchAttributes: temporal.NewSearchAttributes(node.NodeIDKey.ValueSet(nodeID)),
		StaticSummary:         "scheduled GC of node " + nodeID,
	}
	_, err := c.Temporal.ScheduleClient().Create(ctx, client.ScheduleOptions{
		ID: id, Spec: spec, Action: action, Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Note: "created by the node agent of " + nodeID,
	})
	if !errors.Is(err, temporal.ErrScheduleAlreadyRunning) {
		return err
	}
	// The node restarted, maybe with another policy or interval.
	return c.Temporal.ScheduleClient().GetHandle(ctx, id).Update(ctx, client.ScheduleUpdateOptions{
		DoUpdate: func(in client.ScheduleUpdateInput) (*client.ScheduleUpdate, error) {
			in.Description.Schedule.Spec = &spec
			in.Description.Schedule.Action = action
			return &client.ScheduleUpdate{Schedule: &in.Description.Schedule}, nil
		},
	})
}

// UnscheduleGC deletes a node's GC schedule (the node left).
func (c *Models) UnscheduleGC(ctx context.Context, nodeID string) error {
	err := c.Temporal.ScheduleClient().GetHandle(ctx, model.GCWorkflowID(nodeID)).Delete(ctx)
	var notFound *serviceerror.NotFound
	if errors.As(err, &notFound) {
		return nil
	}
	return err
}
