package control

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/node"
)

// Nodes is the client side of the node registry: the calls the apiserver
// and the node agent make on node workflows (register, heartbeat, drain,
// deregister, read). It maps Temporal's answers to the registry's own
// errors so callers never inspect gRPC errors.
type Nodes struct {
	Temporal  client.Client
	Namespace string
	// ContinueAsNewAfterEvents is passed to workflows this client starts
	// (0: the server's suggestion decides).
	ContinueAsNewAfterEvents int
	// Via labels this client's metrics: "rest" in the apiserver, "worker"
	// in the node agent.
	Via     string
	Metrics *NodeMetrics
	// DataConverter decodes the payloads Temporal returns raw (heartbeat
	// details): the clients' converter, codec included; nil: the default.
	DataConverter converter.DataConverter
}

// NodeView is a node as a reader sees it: the workflow's durable status plus the
// live figures of the latest heartbeat, which never enter history.
type NodeView struct {
	node.Status
	RunID         string
	Live          *node.Snapshot
	LastHeartbeat time.Time
}

// Register starts the node's workflow or signals the running one, in one
// atomic call: racing registrations never make two workflows.
func (c *Nodes) Register(ctx context.Context, reg node.Registration) error {
	id := reg.NodeID
	opts := client.StartWorkflowOptions{
		ID:                    node.WorkflowID(id),
		TaskQueue:             node.ControlTaskQueue,
		WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		TypedSearchAttributes: temporal.NewSearchAttributes(
			node.NodeIDKey.ValueSet(id), node.NodeStateKey.ValueSet(string(node.Registering))),
		StaticSummary: reg.Inventory.Summary(id),
		StaticDetails: inventoryDetails(reg.Inventory),
		Memo:          ActorMemo(ctx, nil),
	}
	if reg.Actor == nil {
		reg.Actor = ActorFrom(ctx)
	}
	_, err := c.Temporal.SignalWithStartWorkflow(ctx, opts.ID, node.SignalRegister, reg, opts,
		node.WorkflowType, node.Input{NodeID: id, ContinueAsNewAfterEvents: c.ContinueAsNewAfterEvents})
	if err != nil {
		return fmt.Errorf("register node %s: %w", id, err)
	}
	if c.Metrics != nil {
		c.Metrics.registrations.WithLabelValues(id, c.Via).Inc()
	}
	return nil
}

func inventoryDetails(inv node.Inventory) string {
	var b strings.Builder
	fmt.Fprintf(&b, "**Machine** %s (%s), llorch %s, %d CPU cores, %.1f GiB RAM\n\n",
		inv.MachineID, inv.Hostname, inv.Version, inv.CPUCores, float64(inv.MemoryTotalBytes)/(1<<30))
	if inv.CPUOnly {
		fmt.Fprintf(&b, "**CPU only**: %s\n\n", inv.NVMLError)
	}
	if len(inv.GPUs) > 0 {
		fmt.Fprintf(&b, "Driver %s\n\n| GPU | name | UUID | VRAM | CC |\n|---|---|---|---|---|\n", inv.DriverVersion)
		for _, g := range inv.GPUs {
			fmt.Fprintf(&b, "| %d | %s | %s | %.0f GiB | %s |\n", g.Index, g.Name, g.UUID,
				float64(g.MemoryTotalBytes)/(1<<30), g.ComputeCapability)
		}
	}
	return b.String()
}

// Suspect reports that the node's link was lost: its workflow probes the
// node through Temporal and marks it Offline if the probe goes unanswered.
func (c *Nodes) Suspect(ctx context.Context, nodeID string, s node.Suspicion) error {
	err := c.Temporal.SignalWorkflow(ctx, node.WorkflowID(nodeID), "", node.SignalSuspect, s)
	if err != nil {
		return c.mapErr(ctx, nodeID, err)
	}
	return nil
}

// Update runs a drain, undrain or deregister update and returns the new status.
func (c *Nodes) Update(ctx context.Context, nodeID, name string, req node.Request) (node.Status, error) {
	var st node.Status
	var err error
	if req.Actor == nil {
		req.Actor = ActorFrom(ctx)
	}
	// The server aborts an update whose workflow task failed, typically
	// because a signal (a liveness session's alive) arrived while it was
	// processed, and answers WorkflowNotReady: retry that, briefly.
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		var h client.WorkflowUpdateHandle
		h, err = c.Temporal.UpdateWorkflow(ctx, client.UpdateWorkflowOptions{
			WorkflowID:   node.WorkflowID(nodeID),
			UpdateName:   name,
			Args:         []any{req},
			WaitForStage: client.WorkflowUpdateStageCompleted,
		})
		if err == nil {
			err = h.Get(ctx, &st)
		}
		var notReady *serviceerror.WorkflowNotReady
		if !errors.As(err, &notReady) {
			break
		}
		select {
		case <-ctx.Done():
			return st, err
		case <-time.After(wait):
		}
	}
	if err != nil {
		return st, c.mapErr(ctx, nodeID, err)
	}
	if name == node.UpdateDeregister && c.Metrics != nil {
		c.Metrics.deregistrations.WithLabelValues(nodeID, c.Via).Inc()
	}
	return st, nil
}

// mapErr turns "no such workflow" into ErrNodeNotFound or ErrNodeLeft.
func (c *Nodes) mapErr(ctx context.Context, nodeID string, err error) error {
	var notFound *serviceerror.NotFound
	var appErr *temporal.ApplicationError
	if errors.As(err, &appErr) && appErr.Type() == node.ErrLeft {
		return ErrNodeLeft
	}
	if !errors.As(err, &notFound) {
		return err
	}
	if _, derr := c.Temporal.DescribeWorkflowExecution(ctx, node.WorkflowID(nodeID), ""); derr != nil {
		return ErrNodeNotFound
	}
	return ErrNodeLeft
}

// Get reads one node.
func (c *Nodes) Get(ctx context.Context, nodeID string) (NodeView, error) {
	desc, err := c.Temporal.DescribeWorkflowExecution(ctx, node.WorkflowID(nodeID), "")
	var notFound *serviceerror.NotFound
	if errors.As(err, &notFound) {
		return NodeView{}, ErrNodeNotFound
	}
	if err != nil {
		return NodeView{}, err
	}
	info := desc.GetWorkflowExecutionInfo()
	v := NodeView{RunID: info.GetExecution().GetRunId()}
	switch info.GetStatus() {
	case enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
		val, err := c.Temporal.QueryWorkflow(ctx, node.WorkflowID(nodeID), v.RunID, node.QueryStatus)
		if err != nil {
			return v, fmt.Errorf("query node %s: %w", nodeID, err)
		}
		if err := val.Get(&v.Status); err != nil {
			return v, err
		}
		c.attachLive(&v, desc)
	case enumspb.WORKFLOW_EXECUTION_STATUS_COMPLETED:
		if err := c.Temporal.GetWorkflow(ctx, node.WorkflowID(nodeID), v.RunID).Get(ctx, &v.Status); err != nil {
			return v, err
		}
	default:
		// Terminated or failed by an operator: the node is gone all the same.
		v.Status = node.Status{NodeID: nodeID, State: node.Left, Transitions: []node.Transition{{
			To: node.Left, Reason: "workflow " + strings.ToLower(info.GetStatus().String()), At: info.GetCloseTime().AsTime(),
		}}}
	}
	return v, nil
}

// attachLive reads the latest heartbeat of the liveness session, which is at
// most one beat old, from the pending activity.
func (c *Nodes) attachLive(v *NodeView, desc *workflowservice.DescribeWorkflowExecutionResponse) {
	for _, pa := range desc.GetPendingActivities() {
		if pa.GetActivityId() != v.LivenessActivityID || pa.GetState() != enumspb.PENDING_ACTIVITY_STATE_STARTED {
			continue
		}
		if pa.GetLastHeartbeatTime() != nil {
			v.LastHeartbeat = pa.GetLastHeartbeatTime().AsTime()
		}
		if pa.GetHeartbeatDetails() == nil {
			return
		}
		var snap node.Snapshot
		if err := payloads(c.DataConverter).FromPayloads(pa.GetHeartbeatDetails(), &snap); err == nil {
			v.Live = &snap
		}
	}
}

// List reads every node the namespace knows, running or left, newest run
// per node id.
func (c *Nodes) List(ctx context.Context) ([]NodeView, error) {
	seen := map[string]bool{}
	var ids []string
	var token []byte
	for {
		resp, err := c.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace:     c.Namespace,
			PageSize:      500,
			NextPageToken: token,
			// Runs that continued as new are history; their successor lists the node.
			Query: fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus != 'ContinuedAsNew'", node.WorkflowType),
		})
		if err != nil {
			return nil, fmt.Errorf("list node workflows: %w", err)
		}
		for _, e := range resp.GetExecutions() {
			id, ok := node.IDFromWorkflowID(e.GetExecution().GetWorkflowId())
			if ok && !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		if token = resp.GetNextPageToken(); len(token) == 0 {
			break
		}
	}
	sort.Strings(ids)
	views := make([]NodeView, len(ids))
	errs := make([]error, len(ids))
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			views[i], errs[i] = c.Get(ctx, id)
		}()
	}
	wg.Wait()
	out := views[:0]
	for i, v := range views {
		switch {
		case errors.Is(errs[i], ErrNodeNotFound):
			// Deleted between listing and reading.
		case errs[i] != nil:
			return nil, errs[i]
		default:
			out = append(out, v)
		}
	}
	return out, nil
}

// Heartbeat records a REST agent's heartbeat: on the open liveness session
// by activity id (no history), or as an alive signal when the node was
// Offline (one event per outage, not per beat).
func (c *Nodes) Heartbeat(ctx context.Context, nodeID, identity string, snap node.Snapshot) (node.Status, error) {
	v, err := c.Get(ctx, nodeID)
	if err != nil {
		return node.Status{}, err
	}
	switch {
	case v.State == node.Left:
		return v.Status, ErrNodeLeft
	case v.Agent != node.AgentHTTP:
		return v.Status, ErrAgentManaged
	}
	if v.Connected && v.LivenessActivityID != "" {
		err := c.Temporal.RecordActivityHeartbeatByID(ctx, c.Namespace, node.WorkflowID(nodeID), v.RunID, v.LivenessActivityID, snap)
		var notFound *serviceerror.NotFound
		if err == nil || !errors.As(err, &notFound) {
			return v.Status, err
		}
		// The session timed out between our read and this beat: revive below.
	}
	err = c.Temporal.SignalWorkflow(ctx, node.WorkflowID(nodeID), v.RunID, node.SignalAlive,
		node.Alive{Session: v.Session, Identity: identity, Snapshot: snap})
	if err != nil {
		return v.Status, c.mapErr(ctx, nodeID, err)
	}
	return v.Status, nil
}

// NodeEntry is a running node workflow as a visibility list shows it.
type NodeEntry struct {
	NodeID, RunID string
	State         node.State
}

// Running lists every running node workflow with its NodeState from
// visibility alone: one call per 1000 nodes, no read per node.
func (c *Nodes) Running(ctx context.Context) ([]NodeEntry, error) {
	var out []NodeEntry
	err := listAll(ctx, c.Temporal, c.Namespace,
		fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running'", node.WorkflowType),
		func(e *workflowpb.WorkflowExecutionInfo) {
			id, ok := node.IDFromWorkflowID(e.GetExecution().GetWorkflowId())
			if ok {
				out = append(out, NodeEntry{NodeID: id, RunID: e.GetExecution().GetRunId(),
					State: node.State(keyword(e.GetSearchAttributes(), node.NodeStateKey.GetName()))})
			}
		})
	if err != nil {
		return nil, fmt.Errorf("list node workflows: %w", err)
	}
	return out, nil
}
