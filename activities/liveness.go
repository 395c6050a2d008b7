package activities

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/node"
)

// SnapshotSource gives the figures each heartbeat carries.
type SnapshotSource interface {
	Snapshot() node.Snapshot
}

// NodeActivities run on a node's own task queue, next to its GPUs.
type NodeActivities struct {
	Client   client.Client
	Source   SnapshotSource
	Identity string
	Log      *slog.Logger
	Metrics  *NodeMetrics
}

// Liveness is a node's heartbeat: one long activity whose heartbeats carry a
// snapshot (free VRAM, slots) and never enter workflow history. It tells the
// workflow once that this session is served, then beats until its lease ends
// or the workflow cancels it. A dead worker stops beating and the server times
// the activity out: that is how a node is declared Offline.
func (a *NodeActivities) Liveness(ctx context.Context, in node.LivenessInput) error {
	log := a.Log.With("session", in.Session)
	beat := func() node.Snapshot {
		snap := a.Source.Snapshot()
		activity.RecordHeartbeat(ctx, snap)
		a.Metrics.observe(in.NodeID, snap)
		return snap
	}
	snap := beat()
	err := a.Client.SignalWorkflow(ctx, node.WorkflowID(in.NodeID), "", node.SignalAlive,
		node.Alive{Session: in.Session, Identity: a.Identity, Snapshot: snap})
	var notFound *serviceerror.NotFound
	if errors.As(err, &notFound) {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s has no running workflow (deregistered)", in.NodeID), node.ErrGone, err)
	}
	if err != nil {
		return fmt.Errorf("signal alive for node %s: %w", in.NodeID, err)
	}
	log.Info("liveness session started", "interval", in.Interval)

	tick := time.NewTicker(in.Interval)
	defer tick.Stop()
	lease := time.NewTimer(in.Lease)
	defer lease.Stop()
	for {
		select {
		case <-ctx.Done():
			// Cancelled by the workflow (new session, deregistration) or by
			// the worker stopping; nobody waits for this result.
			log.Info("liveness session ended", "reason", context.Cause(ctx))
			return nil
		case <-lease.C:
			return nil
		case <-tick.C:
			beat()
		}
	}
}

// Probe answers a suspected node's probe: being taken from the node's
// queue and completed at once is the proof a live worker gives.
func (a *NodeActivities) Probe(_ context.Context, in node.ProbeInput) error {
	a.Log.Info("answered a liveness probe (an apiserver lost this node's link)", "node_id", in.NodeID, "session", in.Session)
	return nil
}

// NodeMetrics are the per-node gauges and counters a worker exports.
type NodeMetrics struct {
	Heartbeats    *prometheus.CounterVec
	GPUMemUsed    *prometheus.GaugeVec
	GPUMemTotal   *prometheus.GaugeVec
	GPUUtil       *prometheus.GaugeVec
	DiskFreeBytes *prometheus.GaugeVec
}

// NewNodeMetrics registers the worker's node metrics on reg.
func NewNodeMetrics(reg prometheus.Registerer) *NodeMetrics {
	f := promauto.With(reg)
	return &NodeMetrics{
		Heartbeats: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_heartbeats_total", Help: "Liveness heartbeats sent by this node.",
		}, []string{"node_id"}),
		GPUMemUsed: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_gpu_memory_used_bytes", Help: "GPU memory in use, per GPU.",
		}, []string{"node_id", "gpu"}),
		GPUMemTotal: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_gpu_memory_total_bytes", Help: "GPU memory, per GPU.",
		}, []string{"node_id", "gpu"}),
		GPUUtil: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_gpu_utilization_ratio", Help: "GPU utilisation (0-1), per GPU.",
		}, []string{"node_id", "gpu"}),
		DiskFreeBytes: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_node_model_disk_free_bytes", Help: "Free bytes on the model dir's file system.",
		}, []string{"node_id"}),
	}
}

func (m *NodeMetrics) observe(nodeID string, s node.Snapshot) {
	if m == nil {
		return
	}
	m.Heartbeats.WithLabelValues(nodeID).Inc()
	m.DiskFreeBytes.WithLabelValues(nodeID).Set(float64(s.DiskFreeBytes))
	for _, g := range s.GPUs {
		idx := fmt.Sprint(g.Index)
		m.GPUMemTotal.WithLabelValues(nodeID, idx).Set(float64(g.MemoryTotalBytes))
		m.GPUMemUsed.WithLabelValues(nodeID, idx).Set(float64(g.MemoryTotalBytes - g.MemoryFreeBytes))
		m.GPUUtil.WithLabelValues(nodeID, idx).Set(float64(g.UtilizationPercent) / 100)
	}
}

// ControlActivities run on the control queue, beside the workflows.
type ControlActivities struct{}

// AwaitHTTPHeartbeats is the liveness session of a node whose agent speaks
// REST: it stays open (asynchronous completion) while the apiserver records
// each `POST /v2/nodes/{id}/heartbeat` on it by activity id; a missed beat
// times it out on the server exactly like a dead worker's session.
func (*ControlActivities) AwaitHTTPHeartbeats(ctx context.Context, in node.LivenessInput) error {
	return activity.ErrResultPending
}
