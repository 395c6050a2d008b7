package activities

import (
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// EngineMetrics are a node's pool and engine figures.
type EngineMetrics struct {
	Ready      *prometheus.GaugeVec
	Exits      *prometheus.CounterVec
	Handoff    *prometheus.HistogramVec
	SlotsTotal *prometheus.GaugeVec
	SlotsFree  *prometheus.GaugeVec
	Memory     *prometheus.GaugeVec
}

// NewEngineMetrics registers the engine metrics on reg.
func NewEngineMetrics(reg prometheus.Registerer) *EngineMetrics {
	f := promauto.With(reg)
	return &EngineMetrics{
		Ready: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_ready", Help: "1 while the pool's engine on this node is ready.",
		}, []string{"node_id", "pool_id"}),
		Exits: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_engine_exits_total", Help: "Engine runs that ended, by reason (exited, health, stopped, gone).",
		}, []string{"node_id", "pool_id", "reason"}),
		Handoff: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_engine_handoff_seconds", Help: "Engine spawn to first /health 200 and handoff written.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}, []string{"node_id"}),
		SlotsTotal: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_slots_total", Help: "Slots of the pool's engine.",
		}, []string{"node_id", "pool_id"}),
		SlotsFree: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_slots_free", Help: "Idle slots of the pool's engine.",
		}, []string{"node_id", "pool_id"}),
		Memory: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_memory_bytes", Help: "Memory the pool's engine holds: kind=ram (resident) or vram (NVML, all GPUs).",
		}, []string{"node_id", "pool_id", "kind"}),
	}
}

func (m *EngineMetrics) ready(nodeID, poolID string, load time.Duration) {
	if m == nil {
		return
	}
	m.Ready.WithLabelValues(nodeID, poolID).Set(1)
	m.Handoff.WithLabelValues(nodeID).Observe(load.Seconds())
}

func (m *EngineMetrics) live(nodeID, poolID string, l EngineLive) {
	if m == nil {
		return
	}
	m.SlotsTotal.WithLabelValues(nodeID, poolID).Set(float64(l.SlotsTotal))
	m.SlotsFree.WithLabelValues(nodeID, poolID).Set(float64(l.SlotsFree))
	m.Memory.WithLabelValues(nodeID, poolID, "ram").Set(float64(l.RSSBytes))
	m.Memory.WithLabelValues(nodeID, poolID, "vram").Set(float64(l.VRAMBytes))
}

func (m *EngineMetrics) ended(nodeID, poolID string, r SuperviseResult) {
	if m == nil {
		return
	}
	reason := "gone" // not running on this worker any more
	switch {
	case r.Reason == "stopped" || r.WorkerStopped:
		reason = "stopped"
	case strings.HasPrefix(r.Reason, "health check failed"):
		reason = "health"
	case r.Exited && r.ExitCode != -1:
		reason = "exited"
	}
	m.Exits.WithLabelValues(nodeID, poolID, reason).Inc()
	m.Ready.WithLabelValues(nodeID, poolID).Set(0)
	m.SlotsFree.WithLabelValues(nodeID, poolID).Set(0)
	m.Memory.WithLabelValues(nodeID, poolID, "ram").Set(0)
	m.Memory.WithLabelValues(nodeID, poolID, "vram").Set(0)
}
