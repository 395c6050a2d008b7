package control

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// NodeMetrics count registry changes where they are made, so the apiserver
// (via=rest) and the node agent (via=worker) export the same series.
type NodeMetrics struct {
	registrations   *prometheus.CounterVec
	deregistrations *prometheus.CounterVec
}

// NewNodeMetrics registers the registry counters on reg.
func NewNodeMetrics(reg prometheus.Registerer) *NodeMetrics {
	f := promauto.With(reg)
	return &NodeMetrics{
		registrations: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_registrations_total", Help: "Node registrations, by the path they came through (via=rest|worker).",
		}, []string{"node_id", "via"}),
		deregistrations: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_deregistrations_total", Help: "Node deregistrations, by the path they came through (via=rest|worker).",
		}, []string{"node_id", "via"}),
	}
}
