package apiserver

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"

	"github.com/llorch/llorch/node"
)

type metrics struct {
	requests       *prometheus.CounterVec
	latency        *prometheus.HistogramVec
	authFailures   *prometheus.CounterVec
	catalogChanges *prometheus.CounterVec
	heartbeats     *prometheus.CounterVec
	streamPanics   prometheus.Counter
	openAIRefused  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_api_requests_total", Help: "API requests by route, method and status.",
		}, []string{"route", "method", "status"}),
		latency: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_api_request_duration_seconds", Help: "API request latency by route.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}, []string{"route", "method"}),
		authFailures: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_api_auth_failures_total", Help: "Requests refused by bearer auth, by code.",
		}, []string{"code"}),
		heartbeats: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_rest_heartbeats_total", Help: "Node heartbeats received over REST.",
		}, []string{"node_id"}),
		streamPanics: f.NewCounter(prometheus.CounterOpts{
			Name: "llorch_api_stream_panics_total", Help: "Event stream writers that panicked (recovered; the stream ended).",
		}),
		catalogChanges: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_catalog_changes_total", Help: "Catalog changes made through the API, by operation.",
		}, []string{"op"}),
		openAIRefused: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_api_openai_refused_total",
			Help: "/v1 requests refused for a field llorch does not honour (or not at that value), by endpoint and field (unrecognized: a field OpenAI does not define).",
		}, []string{"endpoint", "param"}),
	}
}

// nodeStateCollector reports how many nodes are in each state, read from
// the NodeState search attribute at scrape time (one visibility call).
type nodeStateCollector struct {
	temporal  client.Client
	namespace string
	desc      *prometheus.Desc
	up        *prometheus.Desc
}

func newNodeStateCollector(c client.Client, namespace string) *nodeStateCollector {
	return &nodeStateCollector{
		temporal: c, namespace: namespace,
		desc: prometheus.NewDesc("llorch_nodes", "Nodes by lifecycle state (running node workflows).", []string{"state"}, nil),
		up:   prometheus.NewDesc("llorch_node_up", "1 when the node is Online or Draining, 0 when Registering or Offline.", []string{"node_id", "state"}, nil),
	}
}

func (n *nodeStateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- n.desc; ch <- n.up }

func (n *nodeStateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	counts := map[node.State]int{}
	var token []byte
	for {
		resp, err := n.temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Namespace: n.namespace, PageSize: 1000, NextPageToken: token,
			Query: "WorkflowType = '" + node.WorkflowType + "' AND ExecutionStatus = 'Running'",
		})
		if err != nil {
			ch <- prometheus.NewInvalidMetric(n.desc, err)
			return
		}
		for _, e := range resp.GetExecutions() {
			id, _ := node.IDFromWorkflowID(e.GetExecution().GetWorkflowId())
			var state string
			if p := e.GetSearchAttributes().GetIndexedFields()[node.NodeStateKey.GetName()]; p != nil {
				_ = converter.GetDefaultDataConverter().FromPayload(p, &state)
			}
			st := node.State(state)
			counts[st]++
			up := 0.0
			if st == node.Online || st == node.Draining {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(n.up, prometheus.GaugeValue, up, id, state)
		}
		if token = resp.GetNextPageToken(); len(token) == 0 {
			break
		}
	}
	for _, st := range node.States {
		if st != node.Left {
			ch <- prometheus.MustNewConstMetric(n.desc, prometheus.GaugeValue, float64(counts[st]), string(st))
		}
	}
}
