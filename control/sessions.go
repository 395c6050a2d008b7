package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/session"
)

// Sessions is the client side of session workflows: take and give back a
// task's turn, read and end a session. Every replica goes through the same
// workflow, so they all see one session.
type Sessions struct {
	Temporal client.Client
}

// Turn takes the turn of task turn.TaskID in session sessionID, starting
// the session if none runs (update-with-start): ErrSessionFull when all its
// turns are taken. A task that has its turn gets the same one back, New false.
func (c *Sessions) Turn(ctx context.Context, sessionID string, turn session.TurnRequest) (session.TurnResult, error) {
	taskID := turn.TaskID
	var r session.TurnResult
	err := updateWithStart(ctx, c.Temporal, client.StartWorkflowOptions{
		ID:        session.WorkflowID(sessionID),
		TaskQueue: node.ControlTaskQueue,
		// A running session takes the turn; one that expired or ended
		// is closed, and a turn starts it afresh under the same id.
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		StaticSummary:            fmt.Sprintf("session %s (at most %d turns, kept %s after the last)", sessionID, session.MaxTurns, session.TTL),
		Memo:                     ActorMemo(ctx, nil),
	}, session.WorkflowType, session.Input{SessionID: sessionID}, session.UpdateTurn, turn, &r)
	var app *temporal.ApplicationError
	if errors.As(err, &app) && app.Type() == session.ErrTurnLimit {
		return r, fmt.Errorf("%w: %s", ErrSessionFull, app.Message())
	}
	if errors.As(err, &app) && app.Type() == session.ErrNotOwner {
		return r, fmt.Errorf("%w: %s", ErrSessionNotFound, app.Message())
	}
	if err != nil {
		return r, fmt.Errorf("session %s: turn for task %s: %w", sessionID, taskID, err)
	}
	return r, nil
}

// Release gives back the turn of a task whose workflow did not start; a
// session that has closed has nothing to give back.
func (c *Sessions) Release(ctx context.Context, sessionID, taskID string) error {
	err := c.update(ctx, sessionID, session.UpdateRelease, session.ReleaseRequest{TaskID: taskID})
	if errors.Is(err, ErrSessionNotFound) {
		return nil
	}
	return err
}

// Get reads a running session that has not expired; ErrSessionNotFound
// otherwise (one round trip: a closed session's query is rejected, not
// replayed).
func (c *Sessions) Get(ctx context.Context, sessionID string) (session.Info, error) {
	var info session.Info
	resp, err := c.Temporal.QueryWorkflowWithOptions(ctx, &client.QueryWorkflowWithOptionsRequest{
		WorkflowID: session.WorkflowID(sessionID), QueryType: session.QueryInfo,
		QueryRejectCondition: enumspb.QUERY_REJECT_CONDITION_NOT_OPEN,
	})
	if err != nil {
		return info, notFound(err, ErrSessionNotFound)
	}
	if resp.QueryRejected != nil {
		return info, ErrSessionNotFound
	}
	if err := resp.QueryResult.Get(&info); err != nil {
		return info, err
	}
	// Past its expiry a session is gone, even before its timer closes it.
	if !info.ExpiresAt.After(time.Now()) {
		return session.Info{}, ErrSessionNotFound
	}
	return info, nil
}

// End ends a running session; ErrSessionNotFound when none runs.
func (c *Sessions) End(ctx context.Context, sessionID string) error {
	var arg any // none without an actor: what workers before audit take
	if a := ActorFrom(ctx); a != nil {
		arg = session.EndRequest{Actor: a}
	}
	return c.update(ctx, sessionID, session.UpdateEnd, arg)
}

func (c *Sessions) update(ctx context.Context, sessionID, name string, arg any) error {
	var args []any
	if arg != nil {
		args = []any{arg}
	}
	h, err := c.Temporal.UpdateWorkflow(ctx, client.UpdateWorkflowOptions{
		WorkflowID: session.WorkflowID(sessionID), UpdateName: name, Args: args,
		WaitForStage: client.WorkflowUpdateStageCompleted,
	})
	if err == nil {
		err = h.Get(ctx, nil)
	}
	if err != nil {
		return notFound(err, ErrSessionNotFound)
	}
	return nil
}
