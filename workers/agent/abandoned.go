package agent

import (
	"context"
	"fmt"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// failAbandonedStagings fails the download attempts an earlier process of
// this node left started when it died (kill -9, OOM, power): Temporal would
// otherwise wait out the staging heartbeat timeout before the retry. The
// retry gets the attempt's last heartbeat details, so it resumes from the
// last checkpoint.
func (a *Agent) failAbandonedStagings(ctx context.Context) error {
	tc := a.Nodes.Temporal
	query := fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running' AND %s = '%s'",
		model.StageWorkflowType, node.NodeIDKey.GetName(), a.NodeID)
	var page []byte
	for {
		resp, err := tc.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace: a.Nodes.Namespace, Query: query, NextPageToken: page,
		})
		if err != nil {
			return fmt.Errorf("list stagings of node %s: %w", a.NodeID, err)
		}
		for _, ex := range resp.GetExecutions() {
			wf := ex.GetExecution()
			d, err := tc.DescribeWorkflowExecution(ctx, wf.GetWorkflowId(), wf.GetRunId())
			if err != nil {
				return fmt.Errorf("describe %s: %w", wf.GetWorkflowId(), err)
			}
			for _, pa := range d.GetPendingActivities() {
				if pa.GetState() != enumspb.PENDING_ACTIVITY_STATE_STARTED || pa.GetLastWorkerIdentity() == a.Identity {
					continue
				}
				msg := fmt.Sprintf("node %s: worker %s is gone (a new one, %s, started): attempt %d abandoned, retried from its last checkpoint",
					a.NodeID, pa.GetLastWorkerIdentity(), a.Identity, pa.GetAttempt())
				_, err := tc.WorkflowService().RespondActivityTaskFailedById(ctx, &workflowservice.RespondActivityTaskFailedByIdRequest{
					Namespace: a.Nodes.Namespace, WorkflowId: wf.GetWorkflowId(), RunId: wf.GetRunId(), ActivityId: pa.GetActivityId(),
					Failure:              temporal.GetDefaultFailureConverter().ErrorToFailure(temporal.NewApplicationError(msg, model.ErrAttemptAbandoned)),
					Identity:             a.Identity,
					LastHeartbeatDetails: pa.GetHeartbeatDetails(),
				})
				if err != nil {
					// It may have just timed out or been retried: nothing to do.
					a.Log.Info("abandoned staging attempt not failed", "workflow_id", wf.GetWorkflowId(), "err", err)
					continue
				}
				a.Log.Info("failed a staging attempt of a gone worker; it resumes now", "workflow_id", wf.GetWorkflowId(),
					"previous_worker", pa.GetLastWorkerIdentity(), "attempt", pa.GetAttempt())
			}
		}
		if page = resp.GetNextPageToken(); len(page) == 0 {
			return nil
		}
	}
}
