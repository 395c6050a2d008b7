package activities

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// Entry reads one catalog entry; a missing or Retired model is final.
func (a *CatalogActivities) Entry(ctx context.Context, id string) (model.Entry, error) {
	if a.Store == nil {
		return model.Entry{}, temporal.NewNonRetryableApplicationError("no model store configured on the control plane", model.ErrNotFound, nil)
	}
	e, err := a.Store.GetEntry(ctx, id)
	if errors.Is(err, modelstore.ErrEntryNotFound) {
		return e, temporal.NewNonRetryableApplicationError(fmt.Sprintf("model %s is not in the catalog", id), model.ErrNotFound, err)
	}
	if err == nil && e.Lifecycle != model.Active {
		return e, temporal.NewNonRetryableApplicationError(fmt.Sprintf("model %s is %s", id, e.Lifecycle), model.ErrRetired, nil)
	}
	return e, err
}

// StagingControl activities run on the control queue: they start or join a
// staging on behalf of a workflow (a pool) and wait for it.
type StagingControl struct {
	Client client.Client
}

// EnsureStaged returns once the model is in the node's catalog, starting
// or joining its staging; a failed staging fails it with the same type.
func (a *StagingControl) EnsureStaged(ctx context.Context, req model.StageRequest) (model.StageResult, error) {
	run, err := control.StartStaging(ctx, a.Client, req.NodeID, req.Entry)
	if err != nil {
		return model.StageResult{}, err
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
	var res model.StageResult
	err = run.Get(ctx, &res)
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) {
		// The staging's own words: its wrapping would repeat them.
		return res, temporal.NewNonRetryableApplicationError(appErr.Message(), appErr.Type(), nil)
	}
	return res, err
}
