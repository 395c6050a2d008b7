package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	workflowpb "go.temporal.io/api/workflow/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
)

// Pools is the client side of pools: create, find, read, reload and
// drain pool workflows, and report engines' handoffs to them.
type Pools struct {
	Temporal  client.Client
	Namespace string
	// DataConverter decodes the payloads Temporal returns raw (memos): the
	// clients' converter, codec included; nil: the default.
	DataConverter converter.DataConverter
}

// Create starts a pool's workflow; a pool id is unique in the cluster.
func (c *Pools) Create(ctx context.Context, s pool.Spec) (string, error) {
	if _, running, err := c.find(ctx, s.PoolID); err == nil && running {
		return "", ErrPoolExists
	}
	id := pool.WorkflowID(s.NodeID, s.PoolID)
	run, err := c.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                       id,
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		TypedSearchAttributes: temporal.NewSearchAttributes(pool.PoolIDKey.ValueSet(s.PoolID),
			node.NodeIDKey.ValueSet(s.NodeID), model.ModelIDKey.ValueSet(s.ModelID), pool.StateKey.ValueSet(string(pool.Starting))),
		Memo:          ActorMemo(ctx, s.Memo()),
		StaticSummary: fmt.Sprintf("pool %s: %s on node %s (%s engine)", s.PoolID, s.ModelID, s.NodeID, s.Engine),
	}, pool.WorkflowType, pool.Input{Spec: s})
	var started *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &started) {
		return "", ErrPoolExists
	}
	if err != nil {
		return "", err
	}
	return run.GetRunID(), nil
}

// find locates the newest workflow of a pool id.
func (c *Pools) find(ctx context.Context, poolID string) (execution, bool, error) {
	resp, err := c.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Namespace: c.Namespace, PageSize: 1,
		// A run that continued as new is history; its successor is the pool.
		Query: fmt.Sprintf("WorkflowType = '%s' AND PoolId = '%s' AND ExecutionStatus != 'ContinuedAsNew'", pool.WorkflowType, poolID),
	})
	if err != nil {
		return execution{}, false, err
	}
	if len(resp.GetExecutions()) == 0 {
		return execution{}, false, ErrPoolNotFound
	}
	e := resp.GetExecutions()[0]
	return execution{id: e.GetExecution().GetWorkflowId(), run: e.GetExecution().GetRunId()},
		e.GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, nil
}

type execution struct{ id, run string }

// Health reads one pool: by query while it runs, its result once ended.
func (c *Pools) Health(ctx context.Context, poolID string) (pool.Health, error) {
	e, running, err := c.find(ctx, poolID)
	if err != nil {
		return pool.Health{}, err
	}
	var h pool.Health
	if running {
		v, err := c.Temporal.QueryWorkflow(ctx, e.id, e.run, pool.QueryHealth)
		if err != nil {
			return h, err
		}
		return h, v.Get(&h)
	}
	err = c.Temporal.GetWorkflow(ctx, e.id, e.run).Get(ctx, &h)
	return h, err
}

// List reads every running pool.
func (c *Pools) List(ctx context.Context) ([]pool.Health, error) {
	pools, _, err := c.ListPartial(ctx)
	return pools, err
}

// ListPartial reads every running pool; unread names the pools (by pool
// id) whose query failed, which a caller may take from an earlier read.
func (c *Pools) ListPartial(ctx context.Context) (pools []pool.Health, unread []string, err error) {
	resp, err := c.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Namespace: c.Namespace, PageSize: 1000,
		Query: fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running'", pool.WorkflowType),
	})
	if err != nil {
		return nil, nil, err
	}
	out := []pool.Health{}
	for _, e := range resp.GetExecutions() {
		v, err := c.Temporal.QueryWorkflow(ctx, e.GetExecution().GetWorkflowId(), e.GetExecution().GetRunId(), pool.QueryHealth)
		var h pool.Health
		if err == nil {
			err = v.Get(&h)
		}
		if err != nil {
			// Ended between list and query, or the query failed.
			if id, ok := pool.IDFromWorkflowID(e.GetExecution().GetWorkflowId()); ok {
				unread = append(unread, id)
			}
			continue
		}
		out = append(out, h)
	}
	return out, unread, nil
}

// update sends an update to a pool's running workflow: ErrPoolNotFound
// when there is no such pool, ErrPoolEnded when it has ended.
func (c *Pools) update(ctx context.Context, poolID, name string, arg any, stage client.WorkflowUpdateStage) (client.WorkflowUpdateHandle, error) {
	e, running, err := c.find(ctx, poolID)
	if err != nil {
		return nil, err
	}
	if !running {
		return nil, ErrPoolEnded
	}
	return c.Temporal.UpdateWorkflow(ctx, client.UpdateWorkflowOptions{
		WorkflowID: e.id, RunID: e.run, UpdateName: name, Args: []any{arg},
		WaitForStage: stage,
	})
}

// Drain stops a pool and returns its final health.
func (c *Pools) Drain(ctx context.Context, poolID string, r pool.DrainRequest) (pool.Health, error) {
	if r.Actor == nil {
		r.Actor = ActorFrom(ctx)
	}
	h, err := c.update(ctx, poolID, pool.UpdateDrain, r, client.WorkflowUpdateStageCompleted)
	var out pool.Health
	if err == nil {
		err = h.Get(ctx, &out)
	}
	return out, err
}

// Reload switches a pool to another model. It returns once the mode is
// known (side by side, or drain first) or the reload failed before that; if
// that takes longer than wait (a large model staging), it returns the
// reload as far as it got, Step saying where.
func (c *Pools) Reload(ctx context.Context, poolID string, r pool.ReloadRequest, wait time.Duration) (pool.ReloadStatus, error) {
	if r.Actor == nil {
		r.Actor = ActorFrom(ctx)
	}
	h, err := c.update(ctx, poolID, pool.UpdateReload, r, client.WorkflowUpdateStageAccepted)
	if err != nil {
		return pool.ReloadStatus{}, rejection(err)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var st pool.ReloadStatus
	err = h.Get(wctx, &st)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil {
		health, herr := c.Health(ctx, poolID)
		if herr == nil && health.Reload != nil {
			return *health.Reload, nil
		}
	}
	return st, err
}

// rejection maps an update's validator errors to ErrPoolEnded and ErrPoolBusy.
func rejection(err error) error {
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		switch app.Type() {
		case pool.ErrEnded:
			return ErrPoolEnded
		case pool.ErrDraining, pool.ErrReloadInProgress:
			return fmt.Errorf("%w: %s", ErrPoolBusy, app.Message())
		}
	}
	return err
}

// Handoff tells a pool of an engine its node found (see pool.HandoffEvent).
// ErrPoolNotFound and ErrPoolEnded say the pool is gone: the engine is nobody's.
func (c *Pools) Handoff(ctx context.Context, nodeID string, ev pool.HandoffEvent) (pool.HandoffReply, error) {
	h, err := c.Temporal.UpdateWorkflow(ctx, client.UpdateWorkflowOptions{
		WorkflowID: pool.WorkflowID(nodeID, ev.Handoff.PoolID), UpdateName: pool.UpdateHandoff, Args: []any{ev},
		WaitForStage: client.WorkflowUpdateStageCompleted,
	})
	var reply pool.HandoffReply
	if err == nil {
		err = h.Get(ctx, &reply)
	}
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) {
		return reply, ErrPoolNotFound
	}
	return reply, rejection(err)
}

// PoolEntry is a running pool as a visibility list shows it: its search
// attributes and memo, no query. Listed is false for a pool started before
// pools carried PoolState and a memo; only Health reads such a pool.
type PoolEntry struct {
	PoolID, NodeID, ModelID string
	WorkflowID, RunID       string
	State                   pool.State
	Slots, CtxSize          int
	Engine                  pool.Engine
	Embeddings              bool
	Listed                  bool
}

// Running lists every running pool from visibility alone: one call per
// 1000 pools, however many pools there are.
func (c *Pools) Running(ctx context.Context) ([]PoolEntry, error) {
	var out []PoolEntry
	err := listAll(ctx, c.Temporal, c.Namespace,
		fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running'", pool.WorkflowType),
		func(e *workflowpb.WorkflowExecutionInfo) {
			sa := e.GetSearchAttributes()
			p := PoolEntry{WorkflowID: e.GetExecution().GetWorkflowId(), RunID: e.GetExecution().GetRunId(),
				PoolID: keyword(sa, pool.PoolIDKey.GetName()), NodeID: keyword(sa, node.NodeIDKey.GetName()),
				ModelID: keyword(sa, model.ModelIDKey.GetName()), State: pool.State(keyword(sa, pool.StateKey.GetName()))}
			if p.PoolID == "" {
				p.PoolID, _ = pool.IDFromWorkflowID(p.WorkflowID)
			}
			f := e.GetMemo().GetFields()
			_, memo := f[pool.MemoSlots]
			p.Listed = p.State != "" && memo
			if memo {
				dc := payloads(c.DataConverter)
				_ = dc.FromPayload(f[pool.MemoSlots], &p.Slots)
				_ = dc.FromPayload(f[pool.MemoCtxSize], &p.CtxSize)
				_ = dc.FromPayload(f[pool.MemoEngine], &p.Engine)
				if e, ok := f[pool.MemoEmbeddings]; ok {
					_ = dc.FromPayload(e, &p.Embeddings)
				}
			}
			out = append(out, p)
		})
	return out, err
}

// QueryHealth reads one running pool's health by query (Health finds it
// by id first; this takes the run a list returned).
func (c *Pools) QueryHealth(ctx context.Context, workflowID, runID string) (pool.Health, error) {
	var h pool.Health
	v, err := c.Temporal.QueryWorkflow(ctx, workflowID, runID, pool.QueryHealth)
	if err == nil {
		err = v.Get(&h)
	}
	return h, err
}

// listAll pages through a visibility query, 1000 executions a call.
func listAll(ctx context.Context, tc client.Client, namespace, query string, each func(*workflowpb.WorkflowExecutionInfo)) error {
	var token []byte
	for {
		resp, err := tc.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace: namespace, PageSize: 1000, NextPageToken: token, Query: query,
		})
		if err != nil {
			return err
		}
		for _, e := range resp.GetExecutions() {
			each(e)
		}
		if token = resp.GetNextPageToken(); len(token) == 0 {
			return nil
		}
	}
}

// payloads is the converter of raw payloads: the client's (its codec
// decrypts, and passes plaintext through), else the SDK's default.
func payloads(dc converter.DataConverter) converter.DataConverter {
	if dc == nil {
		return converter.GetDefaultDataConverter()
	}
	return dc
}

// keyword reads a Keyword search attribute of a list result ("" if unset).
func keyword(sa *commonpb.SearchAttributes, name string) string {
	p, ok := sa.GetIndexedFields()[name]
	if !ok {
		return ""
	}
	var s string
	if err := converter.GetDefaultDataConverter().FromPayload(p, &s); err != nil {
		return ""
	}
	return s
}
