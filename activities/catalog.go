package activities

import (
	"context"
	"errors"
	"fmt"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
)

// ErrModelNotFound is the type of a request for a model the catalog lacks.
const ErrModelNotFound = "MODEL_NOT_FOUND"

// Entry reads one catalog entry; a missing or Retired model is final.
func (a *CatalogActivities) Entry(ctx context.Context, id string) (model.Entry, error) {
	if a.Store == nil {
		return model.Entry{}, temporal.NewNonRetryableApplicationError("no model store configured on the control plane", ErrModelNotFound, nil)
	}
	e, err := a.Store.GetEntry(ctx, id)
	if errors.Is(err, modelstore.ErrEntryNotFound) {
		return e, temporal.NewNonRetryableApplicationError(fmt.Sprintf("model %s is not in the catalog", id), ErrModelNotFound, err)
	}
	if err == nil && e.Lifecycle != model.Active {
		return e, temporal.NewNonRetryableApplicationError(fmt.Sprintf("model %s is %s", id, e.Lifecycle), "MODEL_RETIRED", nil)
	}
	return e, err
}

// StartStaging starts the staging of e onto nodeID, or joins the one
// running (one download per node and digest, however many ask).
func StartStaging(ctx context.Context, c client.Client, nodeID string, e model.Entry) (client.WorkflowRun, error) {
	return c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                       model.StageWorkflowID(nodeID, e.SHA256),
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		TypedSearchAttributes: temporal.NewSearchAttributes(
			node.NodeIDKey.ValueSet(nodeID), model.ModelIDKey.ValueSet(e.ID)),
		StaticSummary: fmt.Sprintf("stage %s (%s) onto %s", e.ID, e.SHA256[:12], nodeID),
	}, model.StageWorkflowType, model.StageRequest{NodeID: nodeID, Entry: e})
}

// StagingControl activities run on the control queue: they start or join a
// staging on behalf of a workflow (a pool) and wait for it.
type StagingControl struct {
	Client client.Client
}

// EnsureStaged returns once the model is in the node's catalog, starting
// or joining its staging; a failed staging fails it with the same type.
func (a *StagingControl) EnsureStaged(ctx context.Context, req model.StageRequest) (StageResult, error) {
	run, err := StartStaging(ctx, a.Client, req.NodeID, req.Entry)
	if err != nil {
		return StageResult{}, err
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				activity.RecordHeartbeat(ctx, run.GetID())
			}
		}
	}()
	var res StageResult
	err = run.Get(ctx, &res)
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) {
		// The staging's own words: its wrapping would repeat them.
		return res, temporal.NewNonRetryableApplicationError(appErr.Message(), appErr.Type(), nil)
	}
	return res, err
}
