package main

import (
	"context"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/fx"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/logging"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/sim"
	"github.com/llorch/llorch/workers"
)

func simCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "simulated parts of a cluster, to measure the control plane",
	}
	cmd.AddCommand(simNodesCmd())
	return cmd
}

func simNodesCmd() *cobra.Command {
	var f simNodesFlags
	cmd := &cobra.Command{
		Use:   "nodes --count N",
		Short: "run N simulated nodes: real node agents with mock GPUs and no engines, on one Temporal connection",
		Long: "Runs N node agents in this process. Each registers and heartbeats like `llorch worker` (node\n" +
			"workflow, liveness activity) but serves no staging, GC or engines. SIGINT or SIGTERM\n" +
			"deregisters them (state Left). With no Temporal flags it joins the `llorch dev` cluster of LLORCH_HOME.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), f.home); err != nil {
				return err
			}
			return runSimNodes(&f)
		},
	}
	f.addFlags(cmd.Flags())
	// The fleet's own flags have no env var: a worker's LLORCH_METRICS_ADDR
	// or LLORCH_NVML_MOCK in the same shell must not reshape a simulation.
	config.BindEnv(cmd.Flags(), nil, "count", "prefix", "nvml-mock", "heartbeat-interval", "start-rate", "metrics-addr")
	return cmd
}

// simNodesFlags are the settings of `llorch sim nodes`.
type simNodesFlags struct {
	common
	count                         int
	prefix, nvmlMock, metricsAddr string
	linkToken                     string
	heartbeat                     time.Duration
	startRate                     float64
}

func (f *simNodesFlags) addFlags(fs *pflag.FlagSet) {
	f.common.addFlags(fs)
	fs.IntVar(&f.count, "count", 0, "how many nodes to simulate (required)")
	fs.StringVar(&f.prefix, "prefix", "sim", "node ids are <prefix>-0 … <prefix>-<count-1>")
	fs.StringVar(&f.nvmlMock, "nvml-mock", "dgxh100", "go-nvml mock server each node simulates (dgxa100, dgxh100, dgxh200); empty: CPU-only nodes")
	fs.DurationVar(&f.heartbeat, "heartbeat-interval", node.DefaultHeartbeatInterval, "liveness heartbeat interval of every node")
	fs.Float64Var(&f.startRate, "start-rate", 50, "registrations started per second while the nodes start")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve the agents' /metrics and /health here (off when empty)")
	config.AddSecret(fs, &f.linkToken, "link-token", "cluster secret the nodes' links check (the apiservers' LLORCH_LINK_TOKEN)")
}

// runSimNodes runs the fleet until SIGINT or SIGTERM.
func runSimNodes(f *simNodesFlags) error {
	log, err := f.logger("component", "sim")
	if err != nil {
		return err
	}
	// The agents' and the SDK's info lines (one per node per event) would
	// drown the fleet's progress: they log warnings and errors, unless debugging.
	nodeLevel := f.level
	if nodeLevel == "info" {
		nodeLevel = "warn"
	}
	nodeLog, err := logging.New(os.Stderr, f.format, nodeLevel, "component", "sim")
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "llorch-sim-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	host, pid := hostname(), os.Getpid()
	tc, err := f.dial(nodeLog, clientIdentity("sim", "", host, pid))
	if err != nil {
		return err
	}
	defer tc.Close()
	reg := newRegistry()
	fleet, err := sim.New(sim.Options{
		Temporal: tc, DataConverter: f.dc, Namespace: f.temporal.Namespace,
		Prefix: f.prefix, Count: f.count, HeartbeatInterval: f.heartbeat, StartRate: f.startRate, LinkToken: f.linkToken,
		NVMLMock: f.nvmlMock, Dir: dir, Version: version(), Registry: reg,
		Identity: func(id string) string { return clientIdentity("sim", id, host, pid) },
		Log:      log, NodeLog: nodeLog,
	})
	if err != nil {
		return err
	}
	opts := []fx.Option{f.pprof(log)}
	if f.metricsAddr != "" {
		opts = append(opts, fx.Invoke(func(lc fx.Lifecycle) { workers.MetricsServer(lc, f.metricsAddr, reg, log) }))
	}
	opts = append(opts, fx.Invoke(func(lc fx.Lifecycle) {
		lc.Append(fx.Hook{OnStart: func(context.Context) error { fleet.Start(); return nil }, OnStop: fleet.Stop})
	}))
	return runApp(log, opts...)
}
