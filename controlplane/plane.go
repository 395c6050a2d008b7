package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/worker"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/keyring"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workflows"
)

// Config is what differs between one apiserver process and another:
// where Temporal and the bucket are, the API's listener, the logs and the
// scheduler's knobs.
type Config struct {
	// Temporal is the one client every part shares; DataConverter is the
	// one it was built with (the payload codec), for the payloads Temporal
	// returns raw (memos, heartbeat details); nil: Temporal's default.
	Temporal      client.Client
	DataConverter converter.DataConverter
	Namespace     string
	// Identity names this process to the node links it follows (and, by
	// convention, to Temporal).
	Identity string
	// Store is the model bucket; nil: no catalog, staging or outputs in
	// the bucket (the catalog routes say so).
	Store *modelstore.Store
	API   apiserver.Config
	// Logger is the process's log; Registry its metrics (every metric of
	// the apiserver, scheduler, key cache and quotas registers there).
	Logger   *slog.Logger
	Registry *prometheus.Registry
	// Audit receives the audit trail as JSON lines (stream=audit);
	// nil: stderr.
	Audit io.Writer
	// MachineID names the host in the audit trail.
	MachineID string

	// QueueCapacity is the tasks that may wait per priority (0: the
	// scheduler's default); Policy what a full queue does
	// (scheduler.Reject, the default, or scheduler.DropLRU).
	QueueCapacity int
	Policy        string
	// AutoPools, when set, starts a pool for a task no pool serves (its
	// Pools and Nodes are set here).
	AutoPools *scheduler.AutoPools
	// OutputRetention prunes task outputs in the bucket this long after
	// they were written (0: keep them).
	OutputRetention time.Duration
	// LinkToken and LinkHTTP reach the node links (LLORCH_LINK_TOKEN,
	// --link-ca); nil LinkHTTP: link.DefaultHTTP.
	LinkToken string
	LinkHTTP  *http.Client
	// NodeContinueAsNewEvents continues node workflows as new after this
	// many history events (0: when Temporal suggests).
	NodeContinueAsNewEvents int
	// FastStart sends an admitted task's generation over the node link to
	// the node of its granted slot while the task's workflow starts
	// (--fast-start): the first token need not wait for Temporal.
	FastStart bool
}

// Plane is one apiserver process, built and not yet started.
type Plane struct {
	// API is the REST API (Addr once started; App for its routes).
	API *apiserver.Server
	// Scheduler admits tasks and holds the pending dispatches.
	Scheduler *scheduler.Scheduler

	cfg    Config
	worker worker.Worker
	view   *scheduler.LinkView
	tasks  *control.Tasks
	ring   *keyring.Ring
	pruner *outputs.Pruner // nil: outputs are kept
	cancel context.CancelFunc
	loops  chan struct{} // closed when the background loops have returned
}

// New wires the process: the control clients, the cluster view and the
// scheduler over them, the key cache, the quotas, the API and the control
// worker. It starts nothing.
func New(cfg Config) (*Plane, error) {
	if cfg.Temporal == nil || cfg.Logger == nil || cfg.Registry == nil {
		return nil, errors.New("controlplane: Temporal, Logger and Registry are required")
	}
	if cfg.Policy == "" {
		cfg.Policy = scheduler.Reject
	}
	if cfg.Policy != scheduler.Reject && cfg.Policy != scheduler.DropLRU {
		return nil, fmt.Errorf("admission policy: want %s or %s, got %q", scheduler.Reject, scheduler.DropLRU, cfg.Policy)
	}
	tc, ns, dc, log, reg := cfg.Temporal, cfg.Namespace, cfg.DataConverter, cfg.Logger, cfg.Registry
	nodes := &control.Nodes{Temporal: tc, Namespace: ns, ContinueAsNewAfterEvents: cfg.NodeContinueAsNewEvents,
		Via: "rest", Metrics: control.NewNodeMetrics(reg), DataConverter: dc}
	hub := &tokenstream.Hub{}
	tokenstream.NewHubMetrics(reg, hub)
	pools, tasks := &control.Pools{Temporal: tc, Namespace: ns, DataConverter: dc}, &control.Tasks{Temporal: tc, Namespace: ns}
	p := &Plane{cfg: cfg, tasks: tasks}
	if cfg.Store != nil {
		outs := &outputs.Store{Bucket: cfg.Store, DC: dc}
		tasks.Outputs = outs
		if cfg.OutputRetention > 0 {
			p.pruner = &outputs.Pruner{Store: outs, Retention: cfg.OutputRetention, Log: log,
				Every: min(max(cfg.OutputRetention/4, time.Second), time.Hour)}
		}
	}
	sessions := &control.Sessions{Temporal: tc}
	p.view = &scheduler.LinkView{Pools: pools, Nodes: nodes, Token: cfg.LinkToken, HTTP: cfg.LinkHTTP, Log: log,
		Metrics: scheduler.NewViewMetrics(reg), Suspect: nodes.Suspect, Identity: cfg.Identity}
	sched := &scheduler.Scheduler{Capacity: cfg.QueueCapacity, Policy: cfg.Policy, Log: log, Metrics: scheduler.NewMetrics(reg),
		Source: p.view.Candidates, Fresh: p.view.Fresh, Tasks: tasks, Sessions: sessions}
	p.view.Changed = sched.Changed
	if cfg.FastStart {
		sched.FastStart = &link.Starter{URL: p.view.LinkURL, Token: cfg.LinkToken, HTTP: cfg.LinkHTTP}
	}
	if cfg.AutoPools != nil {
		auto := *cfg.AutoPools
		auto.Pools, auto.Nodes = pools, nodes
		sched.AutoPools = &auto
	}
	p.Scheduler = sched
	audit := cfg.Audit
	if audit == nil {
		audit = os.Stderr
	}
	keys := &control.Keys{Temporal: tc}
	p.ring = &keyring.Ring{Source: keys, Log: log}
	p.ring.Metrics = keyring.NewMetrics(reg, p.ring)
	quotas := &control.Quotas{Temporal: tc, Metrics: control.NewQuotaMetrics(reg)}
	var err error
	p.API, err = apiserver.New(cfg.API, apiserver.Deps{
		Audit: slog.New(slog.NewJSONHandler(audit, nil)).With("component", "apiserver", "machine_id", cfg.MachineID),
		Keys:  p.ring, KeyRegistry: keys,
		Nodes: nodes, Store: cfg.Store, Registry: reg, Logger: log, Scheduler: sched, Hub: hub, Links: p.view,
		LinkToken: cfg.LinkToken, LinkHTTP: cfg.LinkHTTP,
		Models: &control.Models{Temporal: tc, Namespace: ns, Nodes: nodes, DataConverter: dc},
		Pools:  pools, Tasks: tasks, Sessions: sessions, Quotas: quotas,
	})
	if err != nil {
		return nil, err
	}
	// The control worker's registrations are workers.NewControl's alone.
	p.worker = workers.NewControl(tc, &activities.CatalogActivities{Store: cfg.Store},
		&scheduler.TaskControl{S: sched, Hub: hub, Metrics: sched.Metrics},
		&workflows.Quotas{Counted: quotas.Metrics.Released})
	return p, nil
}

// Start starts the control worker, then the background loops (cluster
// view, scheduler, key cache, output pruner), then the listener, which
// binds before Start returns so a taken port fails here. On an error what
// it started is stopped again.
func (p *Plane) Start(ctx context.Context) error {
	if err := p.worker.Start(); err != nil {
		return fmt.Errorf("start control worker: %w", err)
	}
	p.cfg.Logger.Info("control worker polling", "task_queue", node.ControlTaskQueue)
	loopCtx, cancel := context.WithCancel(context.Background())
	p.cancel, p.loops = cancel, make(chan struct{})
	runs := []func(context.Context){p.view.Run, p.Scheduler.Run, p.ring.Run}
	if p.pruner != nil {
		runs = append(runs, p.pruner.Run)
	}
	done := make(chan struct{}, len(runs))
	for _, run := range runs {
		go func() { defer func() { done <- struct{}{} }(); run(loopCtx) }()
	}
	go func() {
		for range runs {
			<-done
		}
		close(p.loops)
	}()
	p.tasks.SetIndexed(control.EnsureSearchAttributes(ctx, p.cfg.Temporal, p.cfg.Namespace, p.cfg.Logger))
	if err := p.API.Listen(p.cfg.API.Addr); err != nil {
		cancel()
		p.worker.Stop()
		return err
	}
	return nil
}

// Stop ends the API (open event streams first), the background loops and
// the control worker, in that order, within ctx.
func (p *Plane) Stop(ctx context.Context) error {
	err := p.API.Shutdown(ctx)
	if p.cancel != nil {
		p.cancel()
		select {
		case <-p.loops:
		case <-ctx.Done():
		}
	}
	p.worker.Stop()
	return err
}
