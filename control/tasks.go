package control

import (
	"context"
	"errors"
	"fmt"
	"go.temporal.io/api/workflowservice/v1"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
)

// Tasks is the client side of task workflows: start, read, wait for and
// cancel them.
type Tasks struct {
	Temporal client.Client
	// Namespace is where List looks (the client's).
	Namespace string
	// Outputs reads outputs a node stored in the bucket (a status with
	// Output set); nil: such a task's text cannot be read here.
	Outputs OutputReader
	// indexed: the namespace has the task search attributes (SetIndexed).
	indexed atomic.Bool
}

// SetIndexed says whether the namespace has the task search attributes
// (EnsureSearchAttributes): tasks started after it carry them, and List
// filters on them.
func (c *Tasks) SetIndexed(ok bool) { c.indexed.Store(ok) }

// Indexed reports SetIndexed's last word.
func (c *Tasks) Indexed() bool { return c.indexed.Load() }

// OutputReader fetches an output from the bucket, checking it against its
// reference (outputs.Store); a missing or corrupt one is a *task.Error.
type OutputReader interface {
	Read(ctx context.Context, taskID string, ref task.OutputRef) (task.Output, error)
}

// Start starts an admitted task's workflow. A task id is used once: a
// second submission is ErrTaskExists, not the first task's handle.
func (c *Tasks) Start(ctx context.Context, req task.Request) error {
	attrs := []temporal.SearchAttributeUpdate{model.ModelIDKey.ValueSet(req.ModelID)}
	if c.Indexed() {
		// Only where the namespace has them: a start with an unknown
		// search attribute is refused.
		req.Indexed = true
		owner := req.Owner
		if owner == "" {
			owner = apikey.BootstrapID
		}
		attrs = append(attrs, task.OwnerKey.ValueSet(owner))
		if req.SessionID != "" {
			attrs = append(attrs, task.SessionKey.ValueSet(req.SessionID))
		}
	}
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
		TypedSearchAttributes: temporal.NewSearchAttributes(attrs...),
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

// TaskFilter selects the tasks List returns; zero fields select all.
type TaskFilter struct {
	// State: Running (queued or generating), Completed, Failed, Canceled.
	State              task.State
	ModelID, SessionID string
	Owner              string // the submitting key's id
	Since              time.Time
	PageSize           int
	PageToken          []byte
}

// TaskEntry is a task as a list shows it (from visibility: no read of the
// task's workflow).
type TaskEntry struct {
	TaskID     string     `json:"task_id"`
	ModelID    string     `json:"model_id"`
	SessionID  string     `json:"session_id,omitempty"`
	Owner      string     `json:"owner,omitempty"`
	State      task.State `json:"state"`
	StartedAt  time.Time  `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
}

// ErrNotIndexed: the namespace lacks the task search attributes, so tasks
// cannot be listed by them.
var ErrNotIndexed = errors.New("the Temporal namespace lacks the task search attributes (TaskState, TaskOwner, SessionId)")

// List is one page of the tasks f selects, newest first as visibility
// orders them, and the token of the next page (nil: the last).
func (c *Tasks) List(ctx context.Context, f TaskFilter) ([]TaskEntry, []byte, error) {
	if !c.Indexed() {
		return nil, nil, ErrNotIndexed
	}
	q := []string{fmt.Sprintf("WorkflowType = '%s'", task.WorkflowType)}
	switch f.State {
	case "":
	case task.Running:
		q = append(q, "ExecutionStatus = 'Running'")
	default:
		q = append(q, fmt.Sprintf("%s = '%s'", task.StateKey.GetName(), f.State))
	}
	for key, v := range map[string]string{model.ModelIDKey.GetName(): f.ModelID, task.SessionKey.GetName(): f.SessionID,
		task.OwnerKey.GetName(): f.Owner} {
		if v != "" {
			q = append(q, fmt.Sprintf("%s = '%s'", key, strings.ReplaceAll(v, "'", "")))
		}
	}
	if !f.Since.IsZero() {
		q = append(q, fmt.Sprintf("StartTime >= '%s'", f.Since.UTC().Format(time.RFC3339Nano)))
	}
	sort.Strings(q[1:]) // one query for one filter: visibility caches nothing, but logs read better
	resp, err := c.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Namespace: c.Namespace, PageSize: int32(f.PageSize), NextPageToken: f.PageToken, Query: strings.Join(q, " AND "),
	})
	if err != nil {
		return nil, nil, err
	}
	out := make([]TaskEntry, 0, len(resp.GetExecutions()))
	for _, e := range resp.GetExecutions() {
		id, ok := strings.CutPrefix(e.GetExecution().GetWorkflowId(), task.WorkflowID(""))
		if !ok {
			continue
		}
		sa := e.GetSearchAttributes()
		en := TaskEntry{TaskID: id, ModelID: keyword(sa, model.ModelIDKey.GetName()), SessionID: keyword(sa, task.SessionKey.GetName()),
			Owner: keyword(sa, task.OwnerKey.GetName()), State: task.State(keyword(sa, task.StateKey.GetName())),
			StartedAt: e.GetStartTime().AsTime()}
		switch st := e.GetStatus(); {
		case st == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
			en.State = task.Running
		case en.State == "" && st == enumspb.WORKFLOW_EXECUTION_STATUS_COMPLETED:
			en.State = task.Completed // an older task's: its record has the state
		case en.State == "":
			en.State = task.Failed // terminated or timed out
		}
		if ct := e.GetCloseTime(); ct != nil && en.State != task.Running {
			t := ct.AsTime()
			en.FinishedAt = &t
		}
		out = append(out, en)
	}
	return out, resp.GetNextPageToken(), nil
}
