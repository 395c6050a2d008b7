package activities

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// TaskMetrics are a node's generation figures. No task ids as labels.
type TaskMetrics struct {
	TokensIn   *prometheus.CounterVec
	TokensOut  *prometheus.CounterVec
	FirstToken *prometheus.HistogramVec
	Decode     *prometheus.HistogramVec
	// Offloaded counts outputs stored in the bucket (above the inline bound).
	Offloaded *prometheus.CounterVec
	// FastStarts counts generations the node link started ahead of their
	// workflows, by outcome: started, claimed (its Generate activity took
	// it over), abandoned (none came within node.LinkFastStartClaim: it was
	// cancelled), canceled (by the replica: its workflow did not start, or
	// the task was canceled), refused (the node runs or ran one already).
	FastStarts *prometheus.CounterVec
	// TokensCached counts prompt tokens the engines took from a slot's
	// cache instead of decoding them (kv_hint reuse).
	TokensCached *prometheus.CounterVec
}

// NewTaskMetrics registers them on reg.
func NewTaskMetrics(reg prometheus.Registerer) *TaskMetrics {
	f := promauto.With(reg)
	return &TaskMetrics{
		TokensIn: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_task_tokens_in_total", Help: "Prompt tokens of generations run on this node.",
		}, []string{"node_id"}),
		TokensOut: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_task_tokens_out_total", Help: "Tokens generated on this node.",
		}, []string{"node_id"}),
		FirstToken: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_task_first_token_seconds", Help: "Engine request to first token, on the node.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"node_id"}),
		Decode: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_task_decode_seconds", Help: "Decode time of a generation, on the node.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 16),
		}, []string{"node_id"}),
		Offloaded: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_task_outputs_offloaded_total", Help: "Outputs above --max-inline-output stored in the bucket, on this node.",
		}, []string{"node_id"}),
		FastStarts: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_fast_starts_total", Help: "Generations the node link started ahead of their workflows, by outcome (started, claimed, abandoned, canceled, refused).",
		}, []string{"node_id", "outcome"}),
		TokensCached: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_task_tokens_cached_total", Help: "Prompt tokens of generations on this node the engine reused from a slot's cache rather than decoding them.",
		}, []string{"node_id"}),
	}
}

func (m *TaskMetrics) cached(nodeID string, n int) {
	if m != nil && m.TokensCached != nil {
		m.TokensCached.WithLabelValues(nodeID).Add(float64(n))
	}
}

func (m *TaskMetrics) fastStart(nodeID, outcome string) {
	if m != nil && m.FastStarts != nil {
		m.FastStarts.WithLabelValues(nodeID, outcome).Inc()
	}
}

func (m *TaskMetrics) offloaded(nodeID string) {
	if m != nil && m.Offloaded != nil {
		m.Offloaded.WithLabelValues(nodeID).Inc()
	}
}

func (m *TaskMetrics) firstToken(nodeID string, d time.Duration) {
	if m != nil {
		m.FirstToken.WithLabelValues(nodeID).Observe(d.Seconds())
	}
}

func (m *TaskMetrics) generated(nodeID string, in, out int, decode time.Duration) {
	if m != nil {
		m.TokensIn.WithLabelValues(nodeID).Add(float64(in))
		m.TokensOut.WithLabelValues(nodeID).Add(float64(out))
		m.Decode.WithLabelValues(nodeID).Observe(decode.Seconds())
	}
}
