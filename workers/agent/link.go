package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/workers/engines"
)

// Link is the node link an agent serves (package link). It binds when the
// agent starts, before the registration, which carries its URL.
type Link struct {
	Source *link.Source
	Server *link.Server
	// Addr is where it listens (--link-addr); Advertise the host other
	// machines reach the node at (--advertise-address; "": the bound host).
	Addr, Advertise string
}

// linkPoolPoll is how often the feeder rereads the handoff files and the
// engines' liveness: a pool's readiness reaches followers within it.
const linkPoolPoll = 250 * time.Millisecond

// startLink binds the link and feeds its source until stopLink; it
// returns the URL the registration publishes (with hostname when the link
// binds every address and no advertise address is set).
func (a *Agent) startLink(hostname string) (string, error) {
	l := a.Link
	if err := l.Server.Listen(l.Addr); errors.Is(err, link.ErrOpen) {
		return "", fmt.Errorf("node link: %w (set LLORCH_LINK_TOKEN or LLORCH_LINK_TOKEN_FILE)", err)
	} else if err != nil {
		return "", fmt.Errorf("node link cannot listen on %s: %w (change it with --link-addr or LLORCH_LINK_ADDR)", l.Addr, err)
	}
	advertise := l.Advertise
	if ip := l.Server.Addr().(*net.TCPAddr).IP; advertise == "" && ip.IsUnspecified() {
		advertise = hostname
		a.Log.Warn("the node link listens on every address but --advertise-address is empty: publishing the hostname",
			"hostname", advertise)
	}
	url := l.Server.URL(advertise)
	if a.Generate != nil {
		// No engine is known before the feeder's first read: claims are
		// refused (and placed again), never run beyond the slots.
		a.Generate.Running.SetEngines(nil)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.stopFeed, a.feedDone, a.feedNow = cancel, make(chan struct{}), make(chan chan struct{})
	go func() {
		defer close(a.feedDone)
		a.feedLink(ctx)
	}()
	a.Log.Info("node link listening", "url", url, "addr", l.Server.Addr().String())
	return url, nil
}

// stopLink stops feeding and answers the link's long-polls, then waits for
// its requests until ctx ends.
func (a *Agent) stopLink(ctx context.Context) error {
	if a.stopFeed == nil {
		return nil
	}
	a.stopFeed()
	<-a.feedDone
	a.stopFeed = nil
	return a.Link.Server.Shutdown(ctx)
}

// feedLink keeps the link's source true to the node: the host's figures
// and models once per heartbeat interval and when an engine comes or goes,
// the pools every linkPoolPoll, and their slots (busy, queued) as soon as
// a generation claims, waits, starts or ends; it also tells the node's
// slot authority (Generations) which engines it runs.
func (a *Agent) feedLink(ctx context.Context) {
	host := a.Host.Snapshot()
	handoffs := a.handoffs()
	figures := time.NewTicker(a.HeartbeatInterval)
	defer figures.Stop()
	var pollPools <-chan time.Time // a node without engines (simulated) has no pools to read
	if a.Engines != nil {
		pools := time.NewTicker(min(linkPoolPoll, a.HeartbeatInterval))
		defer pools.Stop()
		pollPools = pools.C
	}
	var running <-chan struct{}
	if a.Generate != nil {
		running = a.Generate.Running.Changed()
	}
	set := func() {
		a.Link.Source.Set(node.LinkFacts{At: host.At, Pools: a.linkPools(handoffs), GPUs: host.GPUs,
			DiskFreeBytes: host.DiskFreeBytes, Models: host.Models, ModelBytes: host.ModelBytes})
	}
	rereadPools := func() {
		next := a.handoffs()
		if !sameEngines(handoffs, next) {
			// A new engine may use a model staged since the last beat:
			// the state never names a pool without its model.
			host = a.Host.Snapshot()
		}
		handoffs = next
	}
	for {
		set()
		select {
		case <-ctx.Done():
			return
		case <-figures.C:
			host = a.Host.Snapshot()
		case <-pollPools:
			rereadPools()
		case <-running:
		case done := <-a.feedNow:
			rereadPools()
			set()
			close(done)
		}
	}
}

// syncLink has the link read the handoff files now and returns once its
// state holds them (or ctx ends): a handoff is reported to its pool only
// after the link shows it, so a replica that sees the pool Ready finds its
// engine on the link too. Without a link it returns at once.
func (a *Agent) syncLink(ctx context.Context) {
	if a.feedNow == nil {
		return
	}
	done := make(chan struct{})
	select {
	case a.feedNow <- done:
		select {
		case <-done:
		case <-ctx.Done():
		}
	case <-a.feedDone:
	case <-ctx.Done():
	}
}

// handoffs are the node's handoff files: one per pool whose engine became
// healthy (DESIGN.md decision 8), sorted by pool id.
func (a *Agent) handoffs() []pool.Handoff {
	if a.Engines == nil {
		return nil
	}
	files, _ := filepath.Glob(filepath.Join(a.Engines.Table.Dir(), "*.json"))
	var out []pool.Handoff
	for _, f := range files {
		if h, err := engines.ReadHandoff(f); err == nil && h.PoolID != "" {
			out = append(out, h)
		}
	}
	slices.SortFunc(out, func(x, y pool.Handoff) int { return strings.Compare(x.PoolID, y.PoolID) })
	return out
}

// sameEngines says whether a and b name the same engines.
func sameEngines(a, b []pool.Handoff) bool {
	return slices.EqualFunc(a, b, func(x, y pool.Handoff) bool {
		return x.PoolID == y.PoolID && x.Epoch == y.Epoch && x.PID == y.PID && x.URL == y.URL
	})
}

// linkPools is each handoff's pool as the node sees it now: ready while
// this worker holds the engine the handoff names and it runs.
func (a *Agent) linkPools(handoffs []pool.Handoff) []node.LinkPool {
	out := make([]node.LinkPool, 0, len(handoffs))
	var ready []activities.EngineSlots
	for _, h := range handoffs {
		p := a.Engines.Table.Lookup(h.PoolID, h.Epoch, h.PID)
		lp := node.LinkPool{PoolID: h.PoolID, ModelID: h.Model.ID, Epoch: h.Epoch, URL: h.URL,
			Ready: p != nil && !p.Exited(), SlotsTotal: h.Slots}
		if lp.Ready {
			ready = append(ready, activities.EngineSlots{PoolID: h.PoolID, URL: h.URL, Epoch: h.Epoch, Slots: h.Slots})
		}
		out = append(out, lp)
	}
	if a.Generate == nil {
		return out
	}
	// The node's slots are its Ready engines' before the link shows them:
	// a replica never places on an engine whose claims the node refuses.
	g := a.Generate.Running
	g.SetEngines(ready)
	for i := range out {
		st := g.Stats(out[i].PoolID, out[i].URL)
		out[i].SlotsBusy, out[i].Queued, out[i].QueuedInteractive = st.Running, st.Queued, st.QueuedInteractive
		out[i].ServiceMs, out[i].Claims, out[i].Prefixes = st.ServiceMs, st.Claims, st.Prefixes
	}
	return out
}
