package workers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.temporal.io/sdk/client"
	"go.uber.org/fx"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/workers/agent"
	"github.com/llorch/llorch/workflows"
)

// ControlModule runs the control worker for the life of the fx app.
var ControlModule = fx.Module("control-worker",
	fx.Invoke(func(lc fx.Lifecycle, c client.Client, catalog *activities.CatalogActivities, tasks *scheduler.TaskControl, log *slog.Logger, opt controlOptional) {
		w := NewControl(c, catalog, tasks, opt.Quotas)
		lc.Append(fx.Hook{
			OnStart: func(context.Context) error {
				if err := w.Start(); err != nil {
					return fmt.Errorf("start control worker: %w", err)
				}
				log.Info("control worker polling", "task_queue", node.ControlTaskQueue)
				return nil
			},
			OnStop: func(context.Context) error { w.Stop(); return nil },
		})
	}),
)

// controlOptional are what the control worker takes when supplied: the
// quota workflows' token counter.
type controlOptional struct {
	fx.In
	Quotas *workflows.Quotas `optional:"true"`
}

// NodeModule runs the node agent and its metrics endpoint.
var NodeModule = fx.Module("node-agent",
	fx.Invoke(func(lc fx.Lifecycle, a *agent.Agent) {
		lc.Append(fx.Hook{OnStart: a.Start, OnStop: a.Stop})
	}),
)

// MetricsServer serves /metrics and /health for a worker. It binds when the
// app starts so a taken port fails at once, naming the flag.
func MetricsServer(lc fx.Lifecycle, addr string, reg *prometheus.Registry, log *slog.Logger) {
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte(`{"status":"ok"}`)) })
	srv.Handler = mux
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("worker metrics cannot listen on %s: %w (change it with --metrics-addr or LLORCH_METRICS_ADDR)", addr, err)
			}
			log.Info("worker metrics listening", "addr", ln.Addr().String())
			go func() {
				if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
					log.Error("metrics server stopped", "err", err)
				}
			}()
			return nil
		},
		OnStop: srv.Shutdown,
	})
}
