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
	"go.uber.org/fx"

	"github.com/llorch/llorch/workers/agent"
)

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
