package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"go.temporal.io/sdk/worker"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
)

// InventorySource is what the agent needs from the host.
type InventorySource interface {
	activities.SnapshotSource
	Inventory() node.Inventory
}

// Agent is a node's presence in the cluster: a worker polling node.<id> and
// the registration of the node workflow.
type Agent struct {
	NodeID            string
	Identity          string
	HeartbeatInterval time.Duration
	Nodes             *control.Nodes
	Host              InventorySource
	Log               *slog.Logger
	Metrics           *activities.NodeMetrics
	// Activities beyond liveness this node serves (staging, GC); nil ones
	// are not registered.
	Staging *activities.StagingActivities
	GC      *activities.GCActivities
	Engines *activities.EngineActivities
	// Generate runs tasks' generations on this node's engines.
	Generate *activities.GenerateActivities
	// GCPolicy is reported at registration; GCEvery > 0 schedules GC.
	GCPolicy node.GCPolicy
	GCEvery  time.Duration
	Models   *control.Models
	// Pools receive the node's handoff events (readiness, adoption).
	Pools *control.Pools
	// Link serves the node's live state; the agent feeds it from Host,
	// Engines and Generate while it runs. nil: no link.
	Link *Link
	// ActivityPollers polls node.<id> with this many pollers (0: the SDK's
	// default): `llorch sim nodes` runs a thousand agents with one each.
	ActivityPollers int

	worker      worker.Worker
	stopWatcher context.CancelFunc
	watcherDone chan struct{}
	stopFeed    context.CancelFunc
	feedDone    chan struct{}
	feedNow     chan chan struct{} // syncLink asks feedLink for a read of the handoffs
}

// Start binds the node link, then polls the node's queue, then registers,
// so the liveness session the registration starts is served at once and
// the registration says where the link is.
func (a *Agent) Start(ctx context.Context) (err error) {
	inv := a.Host.Inventory()
	if a.Link != nil {
		if inv.LinkURL, err = a.startLink(inv.Hostname); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				_ = a.stopLink(ctx)
			}
		}()
	}
	a.worker = worker.New(a.Nodes.Temporal, node.TaskQueue(a.NodeID), worker.Options{
		Identity: a.Identity,
		// Every beat reaches the server: the control plane's view of free
		// VRAM and slots is then at most one interval old.
		MaxHeartbeatThrottleInterval:     a.HeartbeatInterval,
		DefaultHeartbeatThrottleInterval: a.HeartbeatInterval,
		WorkerStopTimeout:                5 * time.Second,
		MaxConcurrentActivityTaskPollers: a.ActivityPollers,
		// node.<id> carries activities only (DESIGN.md decision 2): workflow
		// pollers there would only spend the namespace's concurrent poll
		// limit (1200 per API), which caps a cluster near 600 nodes.
		DisableWorkflowWorker: true,
	})
	a.worker.RegisterActivity(&activities.NodeActivities{
		Client: a.Nodes.Temporal, Source: a.Host, Identity: a.Identity, Log: a.Log, Metrics: a.Metrics,
	})
	if a.Staging != nil {
		a.worker.RegisterActivity(a.Staging)
	}
	if a.GC != nil {
		a.worker.RegisterActivity(a.GC)
	}
	if a.Engines != nil {
		a.worker.RegisterActivity(a.Engines)
	}
	if a.Generate != nil {
		a.worker.RegisterActivity(a.Generate)
	}
	var watcher *HandoffWatcher
	if a.Engines != nil && a.Pools != nil {
		watcher = &HandoffWatcher{NodeID: a.NodeID, Engines: a.Engines.Table, Pools: a.Pools, Log: a.Log, BeforeReport: a.syncLink}
		watcher.Claim()
	}
	if err := a.worker.Start(); err != nil {
		return fmt.Errorf("start worker on %s: %w", node.TaskQueue(a.NodeID), err)
	}
	inv.GC = a.GCPolicy
	err = a.Nodes.Register(ctx, node.Registration{
		NodeID: a.NodeID, Agent: node.AgentWorker, Identity: a.Identity,
		HeartbeatInterval: a.HeartbeatInterval, Inventory: inv,
	})
	if err != nil {
		a.worker.Stop()
		return err
	}
	if a.Models != nil && a.GCEvery > 0 {
		if err := a.Models.ScheduleGC(ctx, a.NodeID, a.GCPolicy, a.GCEvery); err != nil {
			a.Log.Warn("cannot schedule GC; run it with POST /v2/nodes/{id}/gc", "err", err)
		}
	}
	a.Log.Info("node registered", "gpus", len(inv.GPUs), "cpu_only", inv.CPUOnly,
		"workflow_id", node.WorkflowID(a.NodeID), "task_queue", node.TaskQueue(a.NodeID), "link_url", inv.LinkURL)
	if a.Staging != nil {
		// After polling starts, so the retries it causes are served here.
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := a.failAbandonedStagings(ctx); err != nil {
				a.Log.Warn("cannot look for stagings a previous worker left; they resume after their heartbeat timeout", "err", err)
			}
		}()
	}
	if watcher != nil {
		// Reports after polling starts: an adopted engine's supervisor
		// runs here.
		wctx, cancel := context.WithCancel(context.Background())
		a.stopWatcher, a.watcherDone = cancel, make(chan struct{})
		go func() {
			defer close(a.watcherDone)
			if err := watcher.Run(wctx); err != nil {
				a.Log.Error("handoff watcher stopped", "err", err)
			}
		}()
	}
	return nil
}

// Stop deregisters the node (state Left) before the worker stops, so the
// control plane learns of a clean shutdown at once instead of by timeout.
func (a *Agent) Stop(ctx context.Context) error {
	_, err := a.Nodes.Update(ctx, a.NodeID, node.UpdateDeregister, node.Request{Identity: a.Identity, Reason: "worker shutting down"})
	switch err {
	case nil:
		a.Log.Info("node deregistered")
	case control.ErrNodeLeft, control.ErrNodeNotFound:
	default:
		a.Log.Error("deregister failed; the node will be marked Offline by timeout", "err", err)
	}
	if a.Models != nil && a.GCEvery > 0 {
		if err := a.Models.UnscheduleGC(ctx, a.NodeID); err != nil {
			a.Log.Warn("cannot delete the GC schedule", "err", err)
		}
	}
	if a.stopWatcher != nil {
		a.stopWatcher()
		<-a.watcherDone
	}
	if err := a.stopLink(ctx); err != nil {
		a.Log.Warn("node link did not stop in time", "err", err)
	}
	if a.worker != nil {
		a.worker.Stop()
	}
	return nil
}

// HostWithModels adds the local model catalog to a host's snapshots, so
// each heartbeat tells the control plane what the node holds.
type HostWithModels struct {
	InventorySource
	Local *modelstore.LocalCatalog
	Log   *slog.Logger
}

// Snapshot is the host's figures plus the verified models on disk.
func (h HostWithModels) Snapshot() node.Snapshot {
	snap := h.InventorySource.Snapshot()
	copies, err := h.Local.Copies()
	if err != nil {
		h.Log.Warn("cannot list the local model catalog", "err", err)
		return snap
	}
	snap.Models = copies
	for _, c := range copies {
		snap.ModelBytes += uint64(c.Size)
	}
	return snap
}
