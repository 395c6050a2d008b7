package tokenstream

import "github.com/prometheus/client_golang/prometheus"

// NewHubMetrics registers the hub's figures on reg: the streams, events and
// bytes it holds (read at each scrape) and the streams ended at a bound.
func NewHubMetrics(reg prometheus.Registerer, h *Hub) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "llorch_token_streams",
			Help: "Task token streams this process holds."}, func() float64 { return float64(h.Len()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "llorch_token_stream_events",
			Help: "Events the held token streams hold."}, func() float64 { return float64(h.events.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "llorch_token_stream_bytes",
			Help: "Bytes of memory the held token streams' events take, as estimated."}, func() float64 { return float64(h.bytes.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "llorch_token_streams_limited_total",
			Help: "Token streams ended with STREAM_LIMIT at a bound of the hub."}, func() float64 { return float64(h.limited.Load()) }),
	)
}
