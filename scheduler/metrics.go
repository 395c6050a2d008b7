package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/llorch/llorch/task"
)

// Metrics are the admission and placement figures. No task ids as labels.
type Metrics struct {
	Enqueued  *prometheus.CounterVec
	Rejected  *prometheus.CounterVec
	Placement *prometheus.CounterVec
	Depth     *prometheus.GaugeVec
	Finished  *prometheus.CounterVec
	Started   *prometheus.CounterVec
	// FastStarts counts generations sent to their nodes ahead of their
	// workflows, by outcome: sent, failed (the node did not take it: the
	// workflow's activity starts it there), canceled (the workflow did not
	// start: the generation was called off).
	FastStarts *prometheus.CounterVec
}

// NewMetrics registers the scheduler's metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		Enqueued: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_tasks_enqueued_total", Help: "Tasks admitted to the queue, by priority.",
		}, []string{"priority"}),
		Rejected: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_tasks_rejected_total", Help: "Tasks refused at admission, by reason.",
		}, []string{"reason"}),
		Placement: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_placement_decisions_total", Help: "Dispatches by outcome: placed (a free slot), queued (joined a busy pool's queue at its node), no_pool.",
		}, []string{"outcome"}),
		Depth: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_queue_depth", Help: "Tasks in the local queue (no Ready pool yet), by priority.",
		}, []string{"priority"}),
		Finished: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_tasks_finished_total", Help: "Tasks that ended, by state (Completed, Failed, Canceled) and error code.",
		}, []string{"state", "code"}),
		Started: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_tasks_started_total", Help: "Tasks dispatched to a pool, by priority.",
		}, []string{"priority"}),
		FastStarts: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_fast_starts_total", Help: "Generations sent to their slot's node over the node link ahead of their workflows, by outcome (sent, failed, canceled).",
		}, []string{"outcome"}),
	}
}

func (m *Metrics) fastStart(outcome string) {
	if m != nil && m.FastStarts != nil {
		m.FastStarts.WithLabelValues(outcome).Inc()
	}
}

func (m *Metrics) enqueued(p task.Priority) {
	if m != nil {
		m.Enqueued.WithLabelValues(string(p)).Inc()
	}
}

func (m *Metrics) started(p task.Priority) {
	if m != nil {
		m.Started.WithLabelValues(string(p)).Inc()
	}
}

func (m *Metrics) rejected(reason string) {
	if m != nil {
		m.Rejected.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) placed(outcome string) {
	if m != nil {
		m.Placement.WithLabelValues(outcome).Inc()
	}
}

func (m *Metrics) depth(p task.Priority, n int) {
	if m != nil {
		m.Depth.WithLabelValues(string(p)).Set(float64(n))
	}
}

func (m *Metrics) finished(s task.State, code string) {
	if m != nil {
		m.Finished.WithLabelValues(string(s), code).Inc()
	}
}
