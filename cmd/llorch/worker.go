package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.temporal.io/sdk/client"
	"go.uber.org/fx"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/cpuset"
	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workers/agent"
	"github.com/llorch/llorch/workers/engines"
)

func workerCmd() *cobra.Command {
	var f workerFlags
	cmd := &cobra.Command{
		Use:   "worker --node-id ID",
		Short: "run a node agent: register the node, prove liveness, serve node.<ID> activities",
		Long: "Runs the node agent for one GPU machine. With no other flags it joins the `llorch dev`\n" +
			"cluster whose state dir is LLORCH_HOME (default .llorch), so a second node is one command.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), f.home); err != nil {
				return err
			}
			return runWorker(&f)
		},
	}
	f.addFlags(cmd.Flags())
	config.BindEnv(cmd.Flags(), nil)
	return cmd
}

// workerFlags are the settings of `llorch worker`.
type workerFlags struct {
	common
	nodeID, machineID, advertiseAddr, modelDir, metricsAddr, nvmlMock string
	linkAddr, linkToken                                               string
	heartbeat                                                         time.Duration
	canAfter                                                          int
	s3                                                                config.S3
	linkTLS                                                           config.ServerTLS
	gc                                                                node.GCPolicy
	gcBudget, diskMargin                                              string
	gcEvery                                                           time.Duration
	runtimeDir, libDir, llamaServer, engineCPUs                       string
	engineThreads                                                     int
	orphanTimeout                                                     time.Duration

	maxInlineOutput string

	// diskMarginBytes is --disk-margin, maxInlineBytes --max-inline-output,
	// parsed by check.
	diskMarginBytes, maxInlineBytes int64
}

func (f *workerFlags) addFlags(fs *pflag.FlagSet) {
	f.common.addFlags(fs)
	fs.StringVar(&f.nodeID, "node-id", "", "stable id of this node (its task queue is node.<id>)")
	fs.StringVar(&f.machineID, "machine-id", "", "machine id for logs and inventory (default /etc/machine-id, else hostname)")
	fs.StringVar(&f.advertiseAddr, "advertise-address", "", "address other hosts reach this node's engines at")
	fs.StringVar(&f.modelDir, "model-dir", "", "local model catalog dir (default <home>/nodes/<node-id>/models)")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "127.0.0.1:0", "listen address of the worker's /metrics (port 0: any free port, logged)")
	fs.StringVar(&f.linkAddr, "link-addr", "127.0.0.1:0", "listen address of the node link, the live state apiservers follow (port 0: any free port; its URL is in the registration)")
	config.AddSecret(fs, &f.linkToken, "link-token", "cluster secret apiservers present to the node link; required to bind a non-loopback --link-addr")
	config.AddServerTLSFlags(fs, &f.linkTLS, "link-tls", "the node link")
	fs.DurationVar(&f.heartbeat, "heartbeat-interval", node.DefaultHeartbeatInterval, "liveness heartbeat interval; the node is Offline after 3 missed beats")
	fs.StringVar(&f.nvmlMock, "nvml-mock", "", "simulate GPUs with a go-nvml mock server (dgxa100, dgxh100, dgxh200): demos and tests only")
	fs.IntVar(&f.canAfter, "node-continue-as-new-events", 0, "continue the node workflow as new after this many history events when this worker starts it (0: when Temporal suggests)")
	config.AddS3Flags(fs, &f.s3)
	fs.StringVar(&f.gcBudget, "gc-budget", "0", "disk budget for this node's models, e.g. 500GiB (0: what the model dir's file system allows)")
	fs.Float64Var(&f.gc.HighWatermark, "gc-high-watermark", 0.9, "GC evicts least recently used models above this fraction of the budget")
	fs.Float64Var(&f.gc.LowWatermark, "gc-low-watermark", 0.75, "... down to this fraction of the budget")
	fs.DurationVar(&f.gc.PartialMaxAge, "gc-partial-max-age", 24*time.Hour, "GC removes partial downloads untouched for this long")
	fs.DurationVar(&f.gcEvery, "gc-interval", 15*time.Minute, "how often the GC schedule runs on this node (0: no schedule)")
	fs.StringVar(&f.diskMargin, "disk-margin", "1GiB", "free space staging keeps beyond a model's size")
	fs.StringVar(&f.maxInlineOutput, "max-inline-output", "256KiB",
		"a task's output above this size (tokens and pieces as JSON) is stored in the bucket under outputs/, its history holds a reference (Temporal refuses payloads over 2MiB); at most 1MiB")
	fs.StringVar(&f.runtimeDir, "runtime-dir", "", "engine handoff files and logs (default <home>/nodes/<node-id>/runtime)")
	fs.StringVar(&f.libDir, "llama-lib-dir", "", "libllama for built-in engines (default ./bin/llama)")
	fs.StringVar(&f.llamaServer, "llama-server", "", "llama-server binary for pools with engine llama-server")
	fs.IntVar(&f.engineThreads, "engine-threads", 1, "decode threads per engine")
	fs.DurationVar(&f.orphanTimeout, "engine-orphan-timeout", time.Minute,
		"how long a built-in engine outlives its worker; a worker back within it adopts the engine instead of restarting it")
	fs.StringVar(&f.engineCPUs, "engine-cpus", "", "CPUs for the engines, e.g. 2-15 (the worker itself keeps to the others); empty: no pinning")
}

// check validates the flags and fills the defaults that derive from others.
func (f *workerFlags) check() error {
	if f.nodeID == "" {
		return fmt.Errorf("--node-id (or LLORCH_NODE_ID) is required")
	}
	if err := node.ValidateID(f.nodeID); err != nil {
		return fmt.Errorf("--node-id: %w", err)
	}
	if f.linkToken == "" && !bearer.Loopback(f.linkAddr) {
		return fmt.Errorf("--link-addr %s: refusing a node link on a non-loopback address without a token: set LLORCH_LINK_TOKEN (or LLORCH_LINK_TOKEN_FILE), or bind a loopback address", f.linkAddr)
	}
	if f.heartbeat < node.MinHeartbeatInterval || f.heartbeat > node.MaxHeartbeatInterval {
		return fmt.Errorf("--heartbeat-interval %s: must be between %s and %s", f.heartbeat, node.MinHeartbeatInterval, node.MaxHeartbeatInterval)
	}
	var err error
	if f.gc.BudgetBytes, err = config.ParseBytes("--gc-budget", f.gcBudget); err != nil {
		return err
	}
	if f.diskMarginBytes, err = config.ParseBytes("--disk-margin", f.diskMargin); err != nil {
		return err
	}
	// Above 1 MiB the task's status (text and pieces, twice the output)
	// would pass Temporal's 2 MiB payload limit before the bound did.
	if f.maxInlineBytes, err = config.ParseBytes("--max-inline-output", f.maxInlineOutput); err != nil {
		return err
	}
	if f.maxInlineBytes < 1 || f.maxInlineBytes > 1<<20 {
		return fmt.Errorf("--max-inline-output %s: want 1B to 1MiB", f.maxInlineOutput)
	}
	if !(0 < f.gc.LowWatermark && f.gc.LowWatermark < f.gc.HighWatermark && f.gc.HighWatermark <= 1) {
		return fmt.Errorf("--gc-low-watermark %.2f and --gc-high-watermark %.2f: want 0 < low < high <= 1",
			f.gc.LowWatermark, f.gc.HighWatermark)
	}
	nodeDir := filepath.Join(f.home, "nodes", f.nodeID)
	if f.modelDir == "" {
		f.modelDir = filepath.Join(nodeDir, "models")
	}
	if f.runtimeDir == "" {
		f.runtimeDir = filepath.Join(nodeDir, "runtime")
	}
	return nil
}

// runWorker builds the node agent and runs it until SIGINT or SIGTERM.
func runWorker(f *workerFlags) error {
	if err := f.check(); err != nil {
		return err
	}
	log, err := f.logger("component", "worker", "node_id", f.nodeID)
	if err != nil {
		return err
	}
	engineCPUs, err := reserveEngineCPUs(f.engineCPUs, log)
	if err != nil {
		return err
	}
	local, err := modelstore.NewLocalCatalog(f.modelDir)
	if err != nil {
		return fmt.Errorf("--model-dir: %w", err)
	}
	store, err := openStore(f.s3, log)
	if err != nil {
		return err
	}
	host, err := f.inventory(log)
	if err != nil {
		return err
	}
	defer host.Shutdown()
	log = log.With("machine_id", host.Inventory().MachineID)
	identity := clientIdentity("worker", f.nodeID, hostname(), os.Getpid())
	tc, err := f.dial(log, identity)
	if err != nil {
		return err
	}
	defer tc.Close()
	reg := newRegistry()
	a := f.agent(log, identity, tc, reg, host, local, store)
	if a.Engines, err = f.engines(log, reg, host, local, engineCPUs); err != nil {
		return err
	}
	linkTLS, err := f.linkTLS.Config()
	if err != nil {
		return err
	}
	if linkTLS == nil && !bearer.Loopback(f.linkAddr) {
		log.Warn("the node link serves plain HTTP on a non-loopback address: its token and the task streams cross the network in clear "+
			"(set --link-tls-cert and --link-tls-key)", "addr", f.linkAddr)
	}
	a.Link = &agent.Link{Source: link.NewSource(f.nodeID), Addr: f.linkAddr, Advertise: f.advertiseAddr}
	a.Link.Server = link.NewServer(a.Link.Source, link.Options{Token: f.linkToken, TLS: linkTLS, Log: log,
		Streams: a.Generate.Streams, Metrics: link.NewMetrics(reg), Generator: activities.FastStart{G: a.Generate}})
	return runApp(log, f.pprof(log),
		fx.Supply(log, a, reg, fx.Annotate(reg, fx.As(new(prometheus.Registerer)))),
		fx.Invoke(func(lc fx.Lifecycle) { workers.MetricsServer(lc, f.metricsAddr, reg, log) }),
		workers.NodeModule,
	)
}

// inventory reads this machine's GPUs, through a mock NVML with --nvml-mock.
func (f *workerFlags) inventory(log *slog.Logger) (*inventory.Collector, error) {
	var lib nvml.Interface
	if f.nvmlMock != "" {
		var err error
		if lib, err = inventory.Mock(f.nvmlMock); err != nil {
			return nil, fmt.Errorf("--nvml-mock: %w", err)
		}
		log.Warn("using a mock NVML: GPU figures are simulated", "mock", f.nvmlMock)
	}
	return inventory.New(inventory.Options{NVML: lib, ModelDir: f.modelDir, MachineID: f.machineID,
		Address: f.advertiseAddr, Version: version(), Logger: log})
}

// agent is the node agent with its Temporal clients and every activity but
// the engines'; staging only with a model bucket (store).
func (f *workerFlags) agent(log *slog.Logger, identity string, tc client.Client, reg *prometheus.Registry,
	host *inventory.Collector, local *modelstore.LocalCatalog, store *modelstore.Store) *agent.Agent {
	nodes := &control.Nodes{Temporal: tc, Namespace: f.temporal.Namespace, ContinueAsNewAfterEvents: f.canAfter,
		Via: "worker", Metrics: control.NewNodeMetrics(reg), DataConverter: f.dc}
	staging := activities.NewStagingMetrics(reg)
	streams := &tokenstream.Hub{}
	tokenstream.NewHubMetrics(reg, streams)
	generate := &activities.GenerateActivities{NodeID: f.nodeID, Log: log, Metrics: activities.NewTaskMetrics(reg),
		Running: &activities.Generations{NodeID: f.nodeID, Metrics: activities.NewSlotMetrics(reg)}, Streams: streams,
		MaxInlineOutput: int(f.maxInlineBytes)}
	if store != nil {
		// Nodes write outputs/ alone in the bucket (docs/security.md).
		generate.Outputs = &outputs.Store{Bucket: store, DC: f.dc}
	} else {
		log.Warn("no S3 store: outputs above --max-inline-output stay inline, and Temporal refuses a payload over 2MiB")
	}
	a := &agent.Agent{
		NodeID: f.nodeID, Identity: identity, HeartbeatInterval: f.heartbeat, Log: log,
		Host:     agent.HostWithModels{InventorySource: host, Local: local, Log: log},
		Nodes:    nodes,
		Metrics:  activities.NewNodeMetrics(reg),
		GC:       &activities.GCActivities{Local: local, Log: log, Metrics: activities.NewGCMetrics(reg), Catalog: staging},
		Generate: generate,
		Models:   &control.Models{Temporal: tc, Namespace: f.temporal.Namespace, Nodes: nodes, DataConverter: f.dc},
		Pools:    &control.Pools{Temporal: tc, Namespace: f.temporal.Namespace, DataConverter: f.dc},
		GCPolicy: f.gc, GCEvery: f.gcEvery,
	}
	if store != nil {
		a.Staging = &activities.StagingActivities{Store: store, Local: local, Client: tc, Log: log,
			Metrics: staging, DiskMargin: f.diskMarginBytes}
	}
	return a
}

// engines starts and supervises this node's engines: built-in ones run this
// binary as `llorch engine`.
func (f *workerFlags) engines(log *slog.Logger, reg *prometheus.Registry, host *inventory.Collector,
	local *modelstore.LocalCatalog, cpus *unix.CPUSet) (*activities.EngineActivities, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	libDir := f.libDir
	if dir, err := engine.LibDir(libDir); err == nil {
		libDir = dir
	} else {
		log.Warn("libllama not found: built-in engines cannot start on this node (run `just tools` or set --llama-lib-dir)", "err", err)
	}
	return &activities.EngineActivities{NodeID: f.nodeID, Local: local, Host: host,
		Table: &engines.Table{NodeID: f.nodeID, RuntimeDir: f.runtimeDir,
			LlorchBin: exe, LlamaServerBin: f.llamaServer, LibDir: libDir, Threads: f.engineThreads, Log: log,
			OrphanTimeout: f.orphanTimeout, CPUs: cpus},
		Metrics: activities.NewEngineMetrics(reg)}, nil
}

// reserveEngineCPUs keeps this process off the CPUs of --engine-cpus, so an
// engine's decode thread never waits for the agent's own work.
func reserveEngineCPUs(list string, log *slog.Logger) (*unix.CPUSet, error) {
	if list == "" {
		return nil, nil
	}
	engines, err := cpuset.Parse(list)
	if err != nil {
		return nil, fmt.Errorf("--engine-cpus: %w", err)
	}
	rest, err := cpuset.Reserve(engines)
	if err != nil {
		return nil, fmt.Errorf("--engine-cpus %s: %w", list, err)
	}
	log.Info("engines pinned", "engine_cpus", cpuset.Format(engines), "worker_cpus", cpuset.Format(rest))
	return &engines, nil
}
