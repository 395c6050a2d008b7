package control

import (
	"context"
	"errors"
	"time"

	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/session"
)

// updateAttempts bounds the retries of an update that reached a workflow
// as it closed (the next attempt reaches, or starts, the next run).
const updateAttempts = 3

// updateWithStart runs update name with arg on the workflow opts.ID,
// starting it (workflowType, input) if none runs, and decodes the update's
// result into result. A run that closes between the start and the update
// (it continued as new, or ended) is retried: the next attempt reaches the
// new run.
func updateWithStart(ctx context.Context, tc client.Client, opts client.StartWorkflowOptions, workflowType string, input any,
	name string, arg, result any) error {
	var err error
	for attempt := 1; ; attempt++ {
		op := tc.NewWithStartWorkflowOperation(opts, workflowType, input)
		var h client.WorkflowUpdateHandle
		h, err = tc.UpdateWithStartWorkflow(ctx, client.UpdateWithStartWorkflowOptions{
			StartWorkflowOperation: op,
			UpdateOptions: client.UpdateWorkflowOptions{WorkflowID: opts.ID, UpdateName: name,
				Args: []any{arg}, WaitForStage: client.WorkflowUpdateStageCompleted},
		})
		if err == nil {
			err = h.Get(ctx, result)
		}
		if err == nil || attempt == updateAttempts || !closedMeanwhile(err) || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(attempt) * 20 * time.Millisecond):
		}
	}
}

// closedMeanwhile says an update met its workflow closing: a session
// refused it as it closed, or the run closed before the update was taken.
func closedMeanwhile(err error) bool {
	var app *temporal.ApplicationError
	var nf *serviceerror.NotFound
	var ab *serviceerror.Aborted
	return errors.As(err, &app) && app.Type() == session.ErrEnded || errors.As(err, &nf) || errors.As(err, &ab)
}
