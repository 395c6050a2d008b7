package activities

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TaskMetrics are a node's generation figures. No task ids as labels.
type TaskMetrics struct {
	TokensIn   prometheus.Counter
	TokensOut  prometheus.Counter
	FirstToken prometheus.Histogram
	Decode     prometheus.Histogram
}

// NewTaskMetrics registers them on reg.
func NewTaskMetrics(reg prometheus.Registerer) *TaskMetrics {
	m := &TaskMetrics{
		TokensIn: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "llorch_task_tokens_in_total", Help: "Prompt tokens of generations run on this node.",
		}),
		TokensOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "llorch_task_tokens_out_total", Help: "Tokens generated on this node.",
		}),
		FirstToken: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "llorch_task_first_token_seconds", Help: "Engine request to first token, on the node.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		Decode: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "llorch_task_decode_seconds", Help: "Decode time of a generation, on the node.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 16),
		}),
	}
	reg.MustRegister(m.TokensIn, m.TokensOut, m.FirstToken, m.Decode)
	return m
}

func (m *TaskMetrics) firstToken(d time.Duration) {
	if m != nil {
		m.FirstToken.Observe(d.Seconds())
	}
}

func (m *TaskMetrics) generated(in, out int, decode time.Duration) {
	if m != nil {
		m.TokensIn.Add(float64(in))
		m.TokensOut.Add(float64(out))
		m.Decode.Observe(decode.Seconds())
	}
}
