package control

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// Models is the client side of staging and GC: stage a model onto a
// node, list what a node holds or is fetching, and run or schedule GC.
type Models struct {
	Temporal  client.Client
	Namespace string
	Nodes     *Nodes
	// DataConverter decodes the payloads Temporal returns raw (a staging's
	// input): the clients' converter, codec included; nil: the default.
	DataConverter converter.DataConverter
}

// Staging is a staging started or joined.
type Staging struct {
	WorkflowID string `json:"workflow_id"`
	RunID      string `json:"run_id"`
}

// Stage starts the staging of e onto nodeID, or joins the one running: one
// download per (node, digest), however many ask.
func (c *Models) Stage(ctx context.Context, nodeID string, e model.Entry) (Staging, error) {
	run, err := StartStaging(ctx, c.Temporal, nodeID, e)
	if err != nil {
		return Staging{}, fmt.Errorf("stage %s onto %s: %w", e.ID, nodeID, err)
	}
	return Staging{WorkflowID: run.GetID(), RunID: run.GetRunID()}, nil
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
		Memo:          ActorMemo(ctx, nil),
	}, model.StageWorkflowType, model.StageRequest{NodeID: nodeID, Entry: e})
}

// NodeModel is one model on (or on its way to) a node.
type NodeModel struct {
	ModelID    string  `json:"model_id"`
	SHA256     string  `json:"sha256"`
	State      string  `json:"state"` // staging | ready | failed
	BytesDone  int64   `json:"bytes_done"`
	BytesTotal int64   `json:"bytes_total"`
	Percent    int     `json:"percent"`
	Rate       float64 `json:"rate_bytes_per_sec,omitempty"`
	Code       string  `json:"code,omitempty"`
	Reason     string  `json:"reason,omitempty"`
	WorkflowID string  `json:"workflow_id,omitempty"`
	node.ModelCopy
}

// NodeModels lists what a node holds (from its latest heartbeat: the disk
// is the truth) and what is being staged onto it or failed to be.
func (c *Models) NodeModels(ctx context.Context, nodeID string) ([]NodeModel, error) {
	v, err := c.Nodes.Get(ctx, nodeID)
	if err != nil {
		return nil, err
	}
	snap := v.LastSnapshot
	if v.Live != nil {
		snap = *v.Live
	}
	bySHA := map[string]*NodeModel{}
	for _, m := range snap.Models {
		bySHA[m.SHA256] = &NodeModel{ModelID: m.ModelID, SHA256: m.SHA256, State: "ready",
			BytesDone: m.Size, BytesTotal: m.Size, Percent: 100, ModelCopy: m}
	}
	resp, err := c.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Namespace: c.Namespace, PageSize: 200,
		Query: fmt.Sprintf("WorkflowType = '%s' AND NodeId = '%s'", model.StageWorkflowType, nodeID),
	})
	if err != nil {
		return nil, fmt.Errorf("list stagings of %s: %w", nodeID, err)
	}
	seen := map[string]bool{}
	for _, e := range resp.GetExecutions() { // newest first
		wid := e.GetExecution().GetWorkflowId()
		if seen[wid] {
			continue
		}
		seen[wid] = true
		switch e.GetStatus() {
		case enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
			val, err := c.Temporal.QueryWorkflow(ctx, wid, e.GetExecution().GetRunId(), model.QueryStageProgress)
			if err != nil {
				continue // finishing right now; the next read shows it
			}
			var st model.StageStatus
			if err := val.Get(&st); err != nil || bySHA[st.SHA256] != nil {
				continue
			}
			bySHA[st.SHA256] = &NodeModel{ModelID: st.ModelID, SHA256: st.SHA256, State: "staging", BytesDone: st.BytesDone,
				BytesTotal: st.BytesTotal, Percent: st.Percent, Rate: st.Rate, WorkflowID: wid}
		case enumspb.WORKFLOW_EXECUTION_STATUS_FAILED, enumspb.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
			enumspb.WORKFLOW_EXECUTION_STATUS_TERMINATED, enumspb.WORKFLOW_EXECUTION_STATUS_CANCELED:
			nm := c.failed(ctx, wid, e)
			if nm != nil && bySHA[nm.SHA256] == nil {
				bySHA[nm.SHA256] = nm
			}
		}
	}
	out := make([]NodeModel, 0, len(bySHA))
	for _, m := range bySHA {
		out = append(out, *m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ModelID+out[i].SHA256 < out[j].ModelID+out[j].SHA256 })
	return out, nil
}

// failed describes a staging that ended without the model: what it was
// for (its input) and why it ended (its error, mapped to a stable code).
func (c *Models) failed(ctx context.Context, wid string, e *workflowpb.WorkflowExecutionInfo) *NodeModel {
	runID := e.GetExecution().GetRunId()
	it := c.Temporal.GetWorkflowHistory(ctx, wid, runID, false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	if !it.HasNext() {
		return nil
	}
	first, err := it.Next()
	if err != nil {
		return nil
	}
	var in model.StageRequest
	if err := payloads(c.DataConverter).FromPayloads(
		first.GetWorkflowExecutionStartedEventAttributes().GetInput(), &in); err != nil {
		return nil
	}
	code, reason := model.ErrStagingFailed, "staging "+strings.ToLower(e.GetStatus().String())
	if err := c.Temporal.GetWorkflow(ctx, wid, runID).Get(ctx, nil); err != nil {
		code, reason = stagingFailure(err)
	}
	return &NodeModel{ModelID: in.Entry.ID, SHA256: in.Entry.SHA256, State: "failed", BytesTotal: in.Entry.Size,
		Code: code, Reason: reason, WorkflowID: wid}
}

// stagingFailure maps a staging error to its stable code and reason.
func stagingFailure(err error) (code, reason string) {
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) && appErr.Type() != "" {
		return appErr.Type(), appErr.Message()
	}
	var timeout *temporal.TimeoutError
	if errors.As(err, &timeout) {
		return model.ErrStagingTimedOut, err.Error()
	}
	return model.ErrStagingFailed, err.Error()
}

// RunGC runs GC on a node now and waits for its result. A real run joins
// one already running (gc:<node>); a dry run has its own id so it never
// joins, or is mistaken for, one that deletes.
func (c *Models) RunGC(ctx context.Context, nodeID string, policy node.GCPolicy, dryRun bool, inUse []string) (model.GCResult, error) {
	id := model.GCRunWorkflowID(nodeID, dryRun)
	run, err := c.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                       id,
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		TypedSearchAttributes:    temporal.NewSearchAttributes(node.NodeIDKey.ValueSet(nodeID)),
		StaticSummary:            fmt.Sprintf("GC of node %s%s", nodeID, map[bool]string{true: " (dry run)"}[dryRun]),
		Memo:                     ActorMemo(ctx, nil),
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
