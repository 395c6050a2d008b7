package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/dustin/go-humanize"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"go.uber.org/fx"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/cpuset"
	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/modelclient"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/nodeclient"
	"github.com/llorch/llorch/poolclient"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workers/agent"
	"github.com/llorch/llorch/workers/engines"
)

func workerCmd() *cobra.Command {
	var c common
	var (
		nodeID, machineID, address, modelDir, metricsAddr, nvmlMock string
		interval                                                    time.Duration
		canAfter                                                    int
		s3                                                          config.S3
		gcPolicy                                                    node.GCPolicy
		gcBudget, diskMargin                                        string
		gcEvery, orphanTimeout                                      time.Duration
		runtimeDir, libDir, llamaServer, engineCPUs                 string
		engineThreads                                               int
	)
	cmd := &cobra.Command{
		Use:   "worker --node-id ID",
		Short: "run a node agent: register the node, prove liveness, serve node.<ID> activities",
		Long: "Runs the node agent for one GPU machine. With no other flags it joins the `llorch dev`\n" +
			"cluster whose state dir is LLORCH_HOME (default .llorch), so a second node is one command.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), c.home); err != nil {
				return err
			}
			if nodeID == "" {
				return fmt.Errorf("--node-id (or LLORCH_NODE_ID) is required")
			}
			if err := node.ValidateID(nodeID); err != nil {
				return fmt.Errorf("--node-id: %w", err)
			}
			if interval < node.MinHeartbeatInterval || interval > node.MaxHeartbeatInterval {
				return fmt.Errorf("--heartbeat-interval %s: must be between %s and %s", interval, node.MinHeartbeatInterval, node.MaxHeartbeatInterval)
			}
			if modelDir == "" {
				modelDir = filepath.Join(c.home, "nodes", nodeID, "models")
			}
			log, err := c.logger("component", "worker", "node_id", nodeID)
			if err != nil {
				return err
			}
			if gcPolicy.BudgetBytes, err = parseBytes("--gc-budget", gcBudget); err != nil {
				return err
			}
			engineSet, err := pinEngineCPUs(engineCPUs, log)
			if err != nil {
				return err
			}
			margin, err := parseBytes("--disk-margin", diskMargin)
			if err != nil {
				return err
			}
			if !(0 < gcPolicy.LowWatermark && gcPolicy.LowWatermark < gcPolicy.HighWatermark && gcPolicy.HighWatermark <= 1) {
				return fmt.Errorf("--gc-low-watermark %.2f and --gc-high-watermark %.2f: want 0 < low < high <= 1",
					gcPolicy.LowWatermark, gcPolicy.HighWatermark)
			}
			local, err := modelstore.NewLocalCatalog(modelDir)
			if err != nil {
				return fmt.Errorf("--model-dir: %w", err)
			}
			store, err := openStore(s3, log)
			if err != nil {
				return err
			}
			var lib nvml.Interface
			if nvmlMock != "" {
				if lib, err = inventory.Mock(nvmlMock); err != nil {
					return fmt.Errorf("--nvml-mock: %w", err)
				}
				log.Warn("using a mock NVML: GPU figures are simulated", "mock", nvmlMock)
			}
			host, err := inventory.New(inventory.Options{NVML: lib, ModelDir: modelDir, MachineID: machineID,
				Address: address, Version: version(), Logger: log})
			if err != nil {
				return err
			}
			defer host.Shutdown()
			log = log.With("machine_id", host.Inventory().MachineID)
			identity := agent.ClientIdentity("worker", nodeID, hostname(), os.Getpid())
			tc, err := c.dial(log, identity)
			if err != nil {
				return err
			}
			defer tc.Close()
			reg := newRegistry()
			stagingMetrics := activities.NewStagingMetrics(reg)
			nodes := &nodeclient.Client{Temporal: tc, Namespace: c.temporal.Namespace, ContinueAsNewAfterEvents: canAfter,
				Via: "worker", Metrics: nodeclient.NewMetrics(reg)}
			agent := &agent.Agent{
				NodeID: nodeID, Identity: identity, HeartbeatInterval: interval, Log: log,
				Host:     agent.HostWithModels{InventorySource: host, Local: local, Log: log},
				Nodes:    nodes,
				Metrics:  activities.NewNodeMetrics(reg),
				GC:       &activities.GCActivities{Local: local, Log: log, Metrics: activities.NewGCMetrics(reg), Catalog: stagingMetrics},
				Models:   &modelclient.Client{Temporal: tc, Namespace: c.temporal.Namespace, Nodes: nodes},
				Pools:    &poolclient.Client{Temporal: tc, Namespace: c.temporal.Namespace},
				GCPolicy: gcPolicy, GCEvery: gcEvery,
			}
			if runtimeDir == "" {
				runtimeDir = filepath.Join(c.home, "nodes", nodeID, "runtime")
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			if dir, err := engine.LibDir(libDir); err == nil {
				libDir = dir
			} else {
				log.Warn("libllama not found: built-in engines cannot start on this node (run `just tools` or set --llama-lib-dir)", "err", err)
			}
			agent.Engines = &activities.EngineActivities{NodeID: nodeID, Local: local, Host: host,
				Table: &engines.Table{NodeID: nodeID, RuntimeDir: runtimeDir,
					LlorchBin: exe, LlamaServerBin: llamaServer, LibDir: libDir, Threads: engineThreads, Log: log,
					OrphanTimeout: orphanTimeout, CPUs: engineSet},
				Metrics: activities.NewEngineMetrics(reg)}
			agent.Generate = &activities.GenerateActivities{NodeID: nodeID, Log: log, Metrics: activities.NewTaskMetrics(reg)}
			if store != nil {
				agent.Staging = &activities.StagingActivities{Store: store, Local: local, Client: tc, Log: log,
					Metrics: stagingMetrics, DiskMargin: margin}
			}
			return runApp(log, c.pprof(log),
				fx.Supply(log, agent, reg, fx.Annotate(reg, fx.As(new(prometheus.Registerer)))),
				fx.Invoke(func(lc fx.Lifecycle) { workers.MetricsServer(lc, metricsAddr, reg, log) }),
				workers.NodeModule,
			)
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	fs.StringVar(&nodeID, "node-id", "", "stable id of this node (its task queue is node.<id>)")
	config.Env(fs, "node-id", "LLORCH_NODE_ID")
	fs.StringVar(&machineID, "machine-id", "", "machine id for logs and inventory (default /etc/machine-id, else hostname)")
	config.Env(fs, "machine-id", "LLORCH_MACHINE_ID")
	fs.StringVar(&address, "advertise-address", "", "address other hosts reach this node's engines at")
	config.Env(fs, "advertise-address", "LLORCH_ADVERTISE_ADDRESS")
	fs.StringVar(&modelDir, "model-dir", "", "local model catalog dir (default <home>/nodes/<node-id>/models)")
	config.Env(fs, "model-dir", "LLORCH_MODEL_DIR")
	fs.StringVar(&metricsAddr, "metrics-addr", "127.0.0.1:0", "listen address of the worker's /metrics (port 0: any free port, logged)")
	config.Env(fs, "metrics-addr", "LLORCH_METRICS_ADDR")
	fs.DurationVar(&interval, "heartbeat-interval", node.DefaultHeartbeatInterval, "liveness heartbeat interval; the node is Offline after 3 missed beats")
	config.Env(fs, "heartbeat-interval", "LLORCH_HEARTBEAT_INTERVAL")
	fs.StringVar(&nvmlMock, "nvml-mock", "", "simulate GPUs with a go-nvml mock server (dgxa100, dgxh100, dgxh200): demos and tests only")
	config.Env(fs, "nvml-mock", "LLORCH_NVML_MOCK")
	fs.IntVar(&canAfter, "node-continue-as-new-events", 0, "continue the node workflow as new after this many history events when this worker starts it (0: when Temporal suggests)")
	config.Env(fs, "node-continue-as-new-events", "LLORCH_NODE_CONTINUE_AS_NEW_EVENTS")
	config.AddS3Flags(fs, &s3)
	fs.StringVar(&gcBudget, "gc-budget", "0", "disk budget for this node's models, e.g. 500GiB (0: what the model dir's file system allows)")
	config.Env(fs, "gc-budget", "LLORCH_GC_BUDGET")
	fs.Float64Var(&gcPolicy.HighWatermark, "gc-high-watermark", 0.9, "GC evicts least recently used models above this fraction of the budget")
	config.Env(fs, "gc-high-watermark", "LLORCH_GC_HIGH_WATERMARK")
	fs.Float64Var(&gcPolicy.LowWatermark, "gc-low-watermark", 0.75, "... down to this fraction of the budget")
	config.Env(fs, "gc-low-watermark", "LLORCH_GC_LOW_WATERMARK")
	fs.DurationVar(&gcPolicy.PartialMaxAge, "gc-partial-max-age", 24*time.Hour, "GC removes partial downloads untouched for this long")
	config.Env(fs, "gc-partial-max-age", "LLORCH_GC_PARTIAL_MAX_AGE")
	fs.DurationVar(&gcEvery, "gc-interval", 15*time.Minute, "how often the GC schedule runs on this node (0: no schedule)")
	config.Env(fs, "gc-interval", "LLORCH_GC_INTERVAL")
	fs.StringVar(&diskMargin, "disk-margin", "1GiB", "free space staging keeps beyond a model's size")
	config.Env(fs, "disk-margin", "LLORCH_DISK_MARGIN")
	fs.StringVar(&runtimeDir, "runtime-dir", "", "engine handoff files and logs (default <home>/nodes/<node-id>/runtime)")
	config.Env(fs, "runtime-dir", "LLORCH_RUNTIME_DIR")
	fs.StringVar(&libDir, "llama-lib-dir", "", "libllama for built-in engines (default ./bin/llama)")
	config.Env(fs, "llama-lib-dir", "LLORCH_LLAMA_LIB_DIR")
	fs.StringVar(&llamaServer, "llama-server", "", "llama-server binary for pools with engine llama-server")
	config.Env(fs, "llama-server", "LLORCH_LLAMA_SERVER")
	fs.IntVar(&engineThreads, "engine-threads", 1, "decode threads per engine")
	config.Env(fs, "engine-threads", "LLORCH_ENGINE_THREADS")
	fs.DurationVar(&orphanTimeout, "engine-orphan-timeout", time.Minute,
		"how long a built-in engine outlives its worker; a worker back within it adopts the engine instead of restarting it")
	config.Env(fs, "engine-orphan-timeout", "LLORCH_ENGINE_ORPHAN_TIMEOUT")
	fs.StringVar(&engineCPUs, "engine-cpus", "", "CPUs for the engines, e.g. 2-15 (the worker itself keeps to the others); empty: no pinning")
	config.Env(fs, "engine-cpus", "LLORCH_ENGINE_CPUS")
	return cmd
}

// pinEngineCPUs reserves the CPUs of --engine-cpus for engines: this
// process keeps to the others, so an engine's decode thread never waits
// for the agent's own work.
func pinEngineCPUs(list string, log *slog.Logger) (*unix.CPUSet, error) {
	if list == "" {
		return nil, nil
	}
	engines, err := cpuset.Parse(list)
	if err != nil {
		return nil, fmt.Errorf("--engine-cpus: %w", err)
	}
	rest, err := cpuset.Split(engines)
	if err != nil {
		return nil, fmt.Errorf("--engine-cpus %s: %w", list, err)
	}
	if err := cpuset.PinProcess(0, rest); err != nil {
		return nil, fmt.Errorf("--engine-cpus: %w", err)
	}
	log.Info("engines pinned", "engine_cpus", cpuset.Format(engines), "worker_cpus", cpuset.Format(rest))
	return &engines, nil
}

// parseBytes reads a size such as 500GiB, 1.5TB or 0.
func parseBytes(flag, v string) (int64, error) {
	n, err := humanize.ParseBytes(v)
	if err != nil {
		return 0, fmt.Errorf("%s %q: want a size such as 500GiB", flag, v)
	}
	return int64(n), nil
}
