package control

import (
	"context"
	"errors"
	"fmt"
	"strings"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
)

// Tasks is the client side of task workflows: start, read, wait for and
// cancel them.
type Tasks struct {
	Temporal client.Client
	// Outputs reads outputs a node stored in the bucket (a status with
	// Output set); nil: such a task's text cannot be read here.
	Outputs OutputReader
}

// OutputReader fetches an output from the bucket, checking it against its
// reference (outputs.Store); a missing or corrupt one is a *task.Error.
type OutputReader interface {
	Read(ctx context.Context, taskID string, ref task.OutputRef) (task.Output, error)
}

// Start starts an admitted task's workflow. A task id is used once: a
// second submission is ErrTaskExists, not the first task's handle.
func (c *Tasks) Start(ctx context.Context, req task.Request) error {
	_, err := c.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                       task.WorkflowID(req.TaskID),
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_REJECT_DUPLICATE,
		// A task id is used once: a second submission is an error, not
		// the first task's handle.
		WorkflowExecutionErrorWhenAlreadyStarted: true,
		// The apiserver runs the control worker: the first workflow task
		// comes back with the start, no dispatch round trip. With a fast
		// start the generation is not waiting for that task, and a start
		// without it answers sooner (the 202 waits for it).
		EnableEagerStart:      req.FastStart == nil,
		Memo:                  ActorMemo(ctx, map[string]any{"correlation_id": req.CorrelationID}),
		TypedSearchAttributes: temporal.NewSearchAttributes(model.ModelIDKey.ValueSet(req.ModelID)),
		StaticSummary:         fmt.Sprintf("task %s: %s, %s priority", req.TaskID, req.ModelID, req.Priority),
	}, task.WorkflowType, req)
	var started *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &started) {
		return ErrTaskExists
	}
	return err
}

// Exists says whether a task's workflow exists (a describe, not a query:
// no workflow task round trip); ErrTaskNotFound if not.
func (c *Tasks) Exists(ctx context.Context, id string) error {
	_, err := c.Temporal.DescribeWorkflowExecution(ctx, task.WorkflowID(id), "")
	return notFound(err, ErrTaskNotFound)
}

// Status reads a task: its query while it runs, its result once ended.
func (c *Tasks) Status(ctx context.Context, id string) (st task.Status, running bool, err error) {
	d, err := c.Temporal.DescribeWorkflowExecution(ctx, task.WorkflowID(id), "")
	if err != nil {
		return st, false, notFound(err, ErrTaskNotFound)
	}
	if d.GetWorkflowExecutionInfo().GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
		v, err := c.Temporal.QueryWorkflow(ctx, task.WorkflowID(id), "", task.QueryStatus)
		if err == nil {
			err = v.Get(&st)
		}
		if err == nil {
			err = c.resolve(ctx, &st)
		}
		return st, true, err
	}
	st, err = c.Result(ctx, id)
	return st, false, err
}

// Result waits for a task's workflow to close and returns its status.
func (c *Tasks) Result(ctx context.Context, id string) (task.Status, error) {
	var st task.Status
	err := c.Temporal.GetWorkflow(ctx, task.WorkflowID(id), "").Get(ctx, &st)
	if err == nil {
		err = c.resolve(ctx, &st)
	}
	return st, err
}

// resolve reads an output the node stored in the bucket into the status's
// Text and Pieces, so no reader sees the difference; a missing or
// corrupt object is an error (a *task.Error), never other text.
func (c *Tasks) resolve(ctx context.Context, st *task.Status) error {
	if st.Output == nil {
		return nil
	}
	if c.Outputs == nil {
		return fmt.Errorf("task %s: its output is in the bucket (%s) and this apiserver has no S3 store (set the --s3-* settings)",
			st.TaskID, st.Output.Key)
	}
	out, err := c.Outputs.Read(ctx, st.TaskID, *st.Output)
	if err != nil {
		return err
	}
	st.Pieces, st.Text, st.Output = out.Pieces, strings.Join(out.Pieces, ""), nil
	return nil
}

// Cancel asks a running task to stop; a task already gone is not an error.
func (c *Tasks) Cancel(ctx context.Context, id, reason string) error {
	// The bare reason without an actor: what workers before audit read.
	var arg any = reason
	if a := ActorFrom(ctx); a != nil {
		arg = task.Cancel{Reason: reason, Actor: a}
	}
	err := c.Temporal.SignalWorkflow(ctx, task.WorkflowID(id), "", task.SignalCancel, arg)
	if errors.Is(notFound(err, ErrTaskNotFound), ErrTaskNotFound) {
		return nil
	}
	return err
}

// Seen tells a task's workflow what this replica's readers have seen of
// it (task.SignalSeen); a task that has ended needs nothing.
func (c *Tasks) Seen(ctx context.Context, id string, p task.Progress) error {
	err := c.Temporal.SignalWorkflow(ctx, task.WorkflowID(id), "", task.SignalSeen, p)
	if errors.Is(notFound(err, ErrTaskNotFound), ErrTaskNotFound) {
		return nil
	}
	return err
}

// notFound turns Temporal's NotFound into sentinel.
func notFound(err, sentinel error) error {
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) {
		return sentinel
	}
	return err
}
