package sim

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/prometheus/client_golang/prometheus"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/workers/agent"
)

// Options are the settings of a fleet of simulated nodes.
type Options struct {
	// Temporal is the one client (one connection) every node shares.
	Temporal client.Client
	// DataConverter is Temporal's converter (the payload codec's); nil:
	// the SDK's default.
	DataConverter converter.DataConverter
	Namespace     string
	// Prefix and Count name the nodes <Prefix>-0 … <Prefix>-<Count-1>.
	Prefix            string
	Count             int
	HeartbeatInterval time.Duration
	// LinkToken is the cluster secret each node's link checks (every node
	// serves one on a loopback port, as a worker does): the apiservers
	// follow them, and detect a node's death by them.
	LinkToken string
	// StartRate is how many nodes begin registering per second.
	StartRate float64
	// NVMLMock names the go-nvml mock server each node simulates
	// (inventory.MockNames); "" makes CPU-only nodes.
	NVMLMock string
	// Dir holds each node's local model catalog, in Dir/<node id>.
	Dir string
	// Identity names a node's worker in Temporal (nil: the node id).
	Identity func(nodeID string) string
	Version  string
	// Registry receives the agents' metrics (nil: none).
	Registry prometheus.Registerer
	// Log reports the fleet's progress; NodeLog is each agent's.
	Log, NodeLog *slog.Logger
}

const (
	// maxStarting bounds registrations in flight: a slow server slows the
	// start instead of piling up calls.
	maxStarting = 64
	// maxStopping bounds deregistrations in flight.
	maxStopping = 100
	// workerStopGrace is what an agent's worker may take to stop after its
	// deregistration (the agent's WorkerStopTimeout is 5 s, and a saturated
	// machine adds to it); Stop keeps it free before its deadline.
	workerStopGrace = 8 * time.Second
	progressEvery   = 5 * time.Second
)

// Fleet is Count simulated nodes.
type Fleet struct {
	o          Options
	nodes      []*simNode
	registered atomic.Int64
	cancel     context.CancelFunc
	starting   sync.WaitGroup
	began      time.Time
}

type simNode struct {
	id    string
	agent *agent.Agent
	host  *inventory.Collector
	// up is set by the node's start goroutine and read once they all ended.
	up bool
}

// NodeID is the id of the i-th node of a fleet named prefix.
func NodeID(prefix string, i int) string { return prefix + "-" + strconv.Itoa(i) }

// New builds the fleet's agents; nothing talks to Temporal until Start.
func New(o Options) (*Fleet, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	if o.Identity == nil {
		o.Identity = func(id string) string { return id }
	}
	nodes := &control.Nodes{Temporal: o.Temporal, Namespace: o.Namespace, Via: "worker",
		Metrics: control.NewNodeMetrics(o.Registry), DataConverter: o.DataConverter}
	metrics := activities.NewNodeMetrics(o.Registry)
	quiet := slog.New(slog.DiscardHandler) // a line per node says nothing a fleet's one line does not
	f := &Fleet{o: o, nodes: make([]*simNode, o.Count)}
	for i := range f.nodes {
		id := NodeID(o.Prefix, i)
		dir := filepath.Join(o.Dir, id)
		local, err := modelstore.NewLocalCatalog(dir)
		if err != nil {
			f.shutdownHosts()
			return nil, fmt.Errorf("simulated node %s: %w", id, err)
		}
		host, err := inventory.New(inventory.Options{NVML: o.nvml(), ModelDir: dir, MachineID: id,
			Version: o.Version, Logger: quiet})
		if err != nil {
			f.shutdownHosts()
			return nil, fmt.Errorf("simulated node %s: %w", id, err)
		}
		log := o.NodeLog.With("node_id", id)
		f.nodes[i] = &simNode{id: id, host: host, agent: &agent.Agent{
			NodeID: id, Identity: o.Identity(id), HeartbeatInterval: o.HeartbeatInterval, Log: log,
			Host:    agent.HostWithModels{InventorySource: host, Local: local, Log: log},
			Nodes:   nodes,
			Metrics: metrics,
			Link:    simLink(id, o.LinkToken, quiet),
			// Liveness is one long activity at a time: one poller serves it,
			// and a thousand nodes stay within Temporal's 1200 concurrent
			// polls per namespace and method (frontend.namespaceCount).
			ActivityPollers: 1,
		}}
	}
	return f, nil
}

// simLink is a node's link on a free loopback port.
func simLink(nodeID, token string, log *slog.Logger) *agent.Link {
	src := link.NewSource(nodeID)
	return &agent.Link{Source: src, Server: link.NewServer(src, link.Options{Token: token, Log: log}), Addr: "127.0.0.1:0"}
}

func (o *Options) check() error {
	switch {
	case o.Temporal == nil:
		return fmt.Errorf("simulated nodes need a Temporal client")
	case o.Count < 1:
		return fmt.Errorf("--count %d: want at least 1 node", o.Count)
	case o.StartRate <= 0:
		return fmt.Errorf("--start-rate %g: want more than 0 registrations per second", o.StartRate)
	case o.HeartbeatInterval < node.MinHeartbeatInterval || o.HeartbeatInterval > node.MaxHeartbeatInterval:
		return fmt.Errorf("--heartbeat-interval %s: must be between %s and %s",
			o.HeartbeatInterval, node.MinHeartbeatInterval, node.MaxHeartbeatInterval)
	case o.Dir == "":
		return fmt.Errorf("simulated nodes need a directory for their model catalogs")
	}
	for _, id := range []string{NodeID(o.Prefix, 0), NodeID(o.Prefix, o.Count-1)} {
		if err := node.ValidateID(id); err != nil {
			return fmt.Errorf("--prefix %q gives node id %q: %w", o.Prefix, id, err)
		}
	}
	if o.NVMLMock != "" {
		if _, err := inventory.Mock(o.NVMLMock); err != nil {
			return fmt.Errorf("--nvml-mock: %w", err)
		}
	}
	return nil
}

// nvml is a fresh simulated NVML for one node: a mock server, or one that
// finds no GPU (a CPU-only node, even on a machine with GPUs).
func (o *Options) nvml() nvml.Interface {
	if o.NVMLMock != "" {
		lib, _ := inventory.Mock(o.NVMLMock) // checked in check
		return lib
	}
	return &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { return 0, nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { return nvml.SUCCESS },
	}
}

// Start begins registering the nodes at StartRate and returns at once;
// a node whose registration fails retries until Stop.
func (f *Fleet) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	gpus := "none (CPU-only)"
	if f.o.NVMLMock != "" {
		gpus = "go-nvml mock " + f.o.NVMLMock
	}
	f.o.Log.Info("starting simulated nodes", "count", len(f.nodes), "first", f.nodes[0].id,
		"start_rate", f.o.StartRate, "heartbeat_interval", f.o.HeartbeatInterval, "gpus", gpus)
	f.began = time.Now()
	f.starting.Add(1)
	go f.run(ctx)
	go f.progress(ctx)
}

func (f *Fleet) run(ctx context.Context) {
	defer f.starting.Done()
	tick := time.NewTicker(time.Duration(float64(time.Second) / f.o.StartRate))
	defer tick.Stop()
	slots := make(chan struct{}, maxStarting)
	for i, n := range f.nodes {
		if i > 0 {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		select {
		case <-ctx.Done():
			return
		case slots <- struct{}{}:
		}
		f.starting.Add(1)
		go func() {
			defer func() { <-slots; f.starting.Done() }()
			f.start(ctx, n)
		}()
	}
}

// start registers one node, retrying as a restarted worker would.
func (f *Fleet) start(ctx context.Context, n *simNode) {
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		err := n.agent.Start(ctx)
		if err == nil {
			n.up = true
			if int(f.registered.Add(1)) == len(f.nodes) {
				f.o.Log.Info("all simulated nodes registered", "count", len(f.nodes), "took", time.Since(f.began).Round(time.Millisecond))
			}
			return
		}
		if ctx.Err() != nil {
			return
		}
		n.agent.Log.Warn("simulated node cannot register; retrying", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// progress logs the registered count while the fleet starts.
func (f *Fleet) progress(ctx context.Context) {
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		n := f.Registered()
		if n == len(f.nodes) {
			return
		}
		f.o.Log.Info("simulated nodes registering", "registered", n, "count", len(f.nodes))
	}
}

// Registered is how many nodes have registered so far.
func (f *Fleet) Registered() int { return int(f.registered.Load()) }

// Stop ends the start, then stops every registered agent, which
// deregisters its node (state Left). Deregistrations end workerStopGrace
// before ctx's deadline, so every worker is stopped by then; a node not
// deregistered in time goes Offline by timeout instead.
func (f *Fleet) Stop(ctx context.Context) error {
	began := time.Now()
	if f.cancel == nil {
		f.shutdownHosts()
		return nil
	}
	f.cancel()
	started := make(chan struct{})
	go func() { f.starting.Wait(); close(started) }()
	select {
	case <-started:
	case <-ctx.Done():
		return fmt.Errorf("simulated nodes still registering when the stop timed out: %w", ctx.Err())
	}
	deregister := ctx
	if d, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		deregister, cancel = context.WithDeadline(ctx, d.Add(-workerStopGrace))
		defer cancel()
	}
	slots := make(chan struct{}, maxStopping)
	var wg sync.WaitGroup
	up := 0
	for _, n := range f.nodes {
		if !n.up {
			n.host.Shutdown()
			continue
		}
		up++
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case slots <- struct{}{}:
				defer func() { <-slots }()
			case <-deregister.Done():
				// Out of time to deregister: stop the worker now, with the rest.
			}
			_ = n.agent.Stop(deregister)
			n.host.Shutdown()
		}()
	}
	wg.Wait()
	f.o.Log.Info("simulated nodes stopped", "nodes", up, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

func (f *Fleet) shutdownHosts() {
	for _, n := range f.nodes {
		if n != nil {
			n.host.Shutdown()
		}
	}
}
