package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/pflag"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/logging"
	"github.com/llorch/llorch/modelstore"
)

// buildVersion is set with -ldflags "-X main.buildVersion=...".
var buildVersion = ""

func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// homeUsage is the meaning of --home to the commands that join a dev cluster.
const homeUsage = "state dir of llorch dev; its dev.env supplies defaults"

// common holds the flags every long-running command shares.
type common struct {
	home string
	logFlags
	temporal  config.Temporal
	connect   time.Duration
	pprofAddr string
	// dc is the data converter dial gave the client (the payload codec
	// when keys are configured), for the payloads Temporal returns raw.
	dc converter.DataConverter
}

func (c *common) addFlags(fs *pflag.FlagSet) {
	config.AddHomeFlag(fs, &c.home, homeUsage)
	c.logFlags.addFlags(fs)
	fs.DurationVar(&c.connect, "temporal-connect-timeout", 60*time.Second, "how long to keep trying to reach Temporal at start")
	fs.StringVar(&c.pprofAddr, "pprof-addr", "", "serve Go's /debug/pprof profiles on this address (off when empty; keep it private)")
	config.AddTemporalFlags(fs, &c.temporal)
}

// logFlags choose the format and level of the log on stderr.
type logFlags struct{ format, level string }

func (l *logFlags) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&l.format, "log-format", "text", "log format: text or json")
	fs.StringVar(&l.level, "log-level", "info", "log level: debug, info, warn, error")
}

func (l *logFlags) logger(attrs ...any) (*slog.Logger, error) {
	return logging.New(os.Stderr, l.format, l.level, attrs...)
}

// pprof serves net/http/pprof on --pprof-addr, apart from the API and
// metrics: profiles show internals, and a CPU profile holds its request
// for its whole duration.
func (c *common) pprof(log *slog.Logger) fx.Option {
	if c.pprofAddr == "" {
		return fx.Options()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return fx.Invoke(func(lc fx.Lifecycle) {
		lc.Append(fx.Hook{
			OnStart: func(context.Context) error {
				ln, err := net.Listen("tcp", c.pprofAddr)
				if err != nil {
					return fmt.Errorf("--pprof-addr %s: %w", c.pprofAddr, err)
				}
				log.Info("pprof listening", "url", "http://"+ln.Addr().String()+"/debug/pprof/")
				go func() { _ = srv.Serve(ln) }()
				return nil
			},
			OnStop: srv.Shutdown,
		})
	})
}

// dial connects to Temporal, retrying while it starts (compose, systemd and
// `llorch dev` may start us first).
func (c *common) dial(log *slog.Logger, identity string) (client.Client, error) {
	opts, err := c.temporal.ClientOptions(log, identity)
	if err != nil {
		return nil, err
	}
	c.dc = opts.DataConverter
	deadline := time.Now().Add(c.connect)
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cl, err := client.DialContext(ctx, opts)
		cancel()
		if err == nil {
			return cl, nil
		}
		if time.Now().Add(wait).After(deadline) {
			return nil, fmt.Errorf("cannot reach Temporal at %s (namespace %s) within %s: %w (set --temporal-address or LLORCH_TEMPORAL_ADDRESS)",
				c.temporal.Address, c.temporal.Namespace, c.connect, err)
		}
		log.Warn("Temporal not reachable yet, retrying", "address", c.temporal.Address, "err", err)
		time.Sleep(wait)
	}
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// stopSignals receives SIGINT and SIGTERM from the moment the process
// starts (see main).
var stopSignals = make(chan os.Signal, 1)

// runApp starts an fx app, waits for SIGINT/SIGTERM and stops it.
func runApp(log *slog.Logger, opts ...fx.Option) error {
	opts = append(opts,
		fx.WithLogger(func() fxevent.Logger {
			l := &fxevent.SlogLogger{Logger: log.With("component", "fx")}
			l.UseLogLevel(slog.LevelDebug)
			return l
		}),
		fx.StartTimeout(30*time.Second), fx.StopTimeout(20*time.Second))
	app := fx.New(opts...)
	if err := app.Err(); err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(context.Background(), app.StartTimeout())
	defer cancel()
	if err := app.Start(startCtx); err != nil {
		return err
	}
	// stopSignals, not app.Wait: a SIGTERM that arrived while we were still
	// starting is kept there, and still ends in a clean stop (a worker
	// deregisters) instead of the default action killing the process.
	sig := <-stopSignals
	log.Info("stopping", "signal", sig.String())
	stopCtx, cancelStop := context.WithTimeout(context.Background(), app.StopTimeout())
	defer cancelStop()
	return app.Stop(stopCtx)
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}

// openStore connects to the model bucket; without S3 credentials there is
// no catalog, which the catalog routes then say.
func openStore(cfg config.S3, log *slog.Logger) (*modelstore.Store, error) {
	if cfg.AccessKey == "" {
		log.Warn("no S3 credentials (--s3-access-key): the model catalog and staging are unavailable")
		return nil, nil
	}
	return modelstore.New(cfg)
}

// clientIdentity names a process in the Temporal UI.
func clientIdentity(role, nodeID, hostname string, pid int) string {
	if nodeID != "" {
		return fmt.Sprintf("%s:%s@%s/%d", role, nodeID, hostname, pid)
	}
	return fmt.Sprintf("%s@%s/%d", role, hostname, pid)
}
