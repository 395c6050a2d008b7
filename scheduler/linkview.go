package scheduler

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"golang.org/x/time/rate"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
)

// PoolMembers lists the running pools from visibility (control.Pools), and
// reads one by query: only pools that predate PoolState need it.
type PoolMembers interface {
	Running(ctx context.Context) ([]control.PoolEntry, error)
	QueryHealth(ctx context.Context, workflowID, runID string) (pool.Health, error)
}

// NodeMembers lists the running nodes from visibility (control.Nodes), and
// reads one: once per node followed, to learn its link.
type NodeMembers interface {
	Running(ctx context.Context) ([]control.NodeEntry, error)
	Get(ctx context.Context, nodeID string) (control.NodeView, error)
}

// LinkView is the scheduler's view of the cluster, kept by events: the
// members come from two visibility lists every Every (pools with PoolState
// and their memo, nodes with NodeState), whose count does not grow with the
// cluster; each Online node is followed on its node link by one long-poll
// at a time, so a change on a node is in the view within a round trip.
// Candidates answers from memory, with no Temporal call.
//
// Following the links is also the fast failure detector: a link whose
// connection fails (a killed worker's resets at once; a lost machine's
// goes silent past the TCP keep-alive) is reported to the node's workflow
// through Suspect, which probes the node and marks it Offline when the
// probe goes unanswered.
//
// Pools that predate PoolState, and pools on nodes that serve no link (an
// older worker), are read the old way, by one query each per refresh (and
// their node by one Get), so a mixed cluster keeps working.
type LinkView struct {
	Pools PoolMembers
	Nodes NodeMembers
	// Token is the cluster secret presented to node links (--link-token).
	Token string
	// HTTP sends link requests; nil: link.DefaultHTTP, whose TCP
	// keep-alive probes make a silent machine's long-poll fail in about
	// 5 s instead of at its wait bound.
	HTTP *http.Client
	// Every is the membership period; 0: 1 s.
	Every time.Duration
	// Wait bounds each long-poll; 0: the link's default.
	Wait time.Duration
	// Stale is how long an unreachable link's last state stands; 0: three
	// of the node's heartbeat intervals, at most maxStale.
	Stale   time.Duration
	Log     *slog.Logger
	Metrics *ViewMetrics
	// Changed, when set, is told of every change a link brings and of
	// every membership read (Scheduler.Changed); it must not block.
	Changed func()
	// Suspect, when set, reports a node whose link failed
	// (control.Nodes.Suspect): once when it fails after an answer, then at
	// most once per suspectEvery while it keeps failing.
	Suspect func(ctx context.Context, nodeID string, s node.Suspicion) error
	// Identity names this apiserver in suspicions.
	Identity string
	// suspects bounds this view's suspicions in all (maxSuspicions): an
	// apiserver cut off from every node must not flood Temporal.
	suspects     *rate.Limiter
	suspectsOnce sync.Once

	mu       sync.Mutex
	run      context.Context // Run's: followers live as long as it
	listed   bool
	pools    []control.PoolEntry
	members  map[string]control.NodeEntry
	follow   map[string]*follower
	fallback map[string]placement.Candidate // pool id -> last read by query
	// noLink are nodes (id -> run id) known to serve no link: followed
	// (read by Get) only while they have pools.
	noLink map[string]string
}

// follower is one node's link as the view follows it; its fields are
// guarded by LinkView.mu.
type follower struct {
	nodeID, runID string
	url           string // the link's, as last learned
	cancel        context.CancelFunc
	stale         time.Duration
	state         *node.LinkState // nil until the link first answered
	at            time.Time       // of the last answer (or of the start)
	polling       bool            // a long-poll is open after a good answer
	noLink        bool            // the node serves no link: read by Get
	snapshot      node.Snapshot   // noLink: its latest figures
	first         chan struct{}   // closed once the link first answered or failed
	tried         bool            // first is closed
	suspected     time.Time       // the last Suspect sent
}

// settled closes first once. Called with LinkView.mu held.
func (f *follower) settled() {
	if !f.tried {
		f.tried = true
		close(f.first)
	}
}

// ViewMetrics are the view's figures.
type ViewMetrics struct {
	links      prometheus.Gauge
	linkErrors prometheus.Counter
	age        prometheus.Gauge
	lists      prometheus.Counter
	nodeReads  prometheus.Counter
	suspicions prometheus.Counter
}

// NewViewMetrics registers the view's metrics on reg.
func NewViewMetrics(reg prometheus.Registerer) *ViewMetrics {
	f := promauto.With(reg)
	return &ViewMetrics{
		links: f.NewGauge(prometheus.GaugeOpts{
			Name: "llorch_view_links", Help: "Node links the cluster view follows.",
		}),
		linkErrors: f.NewCounter(prometheus.CounterOpts{
			Name: "llorch_view_link_errors_total", Help: "Node link reads that failed (unreachable, refused, another node).",
		}),
		age: f.NewGauge(prometheus.GaugeOpts{
			Name: "llorch_view_age_seconds", Help: "Age of the oldest node state in the cluster view (0 while every followed link holds a long-poll open).",
		}),
		lists: f.NewCounter(prometheus.CounterOpts{
			Name: "llorch_view_membership_lists_total", Help: "Visibility list calls the cluster view made for its membership (pools and nodes).",
		}),
		nodeReads: f.NewCounter(prometheus.CounterOpts{
			Name: "llorch_view_node_reads_total", Help: "Reads of one node the cluster view made: to learn a link, or for a node without one.",
		}),
		suspicions: f.NewCounter(prometheus.CounterOpts{
			Name: "llorch_view_suspicions_total", Help: "Nodes reported to their workflow because their link failed (each is then probed through Temporal).",
		}),
	}
}

// count adds one to a counter of m's (none without metrics).
func (m *ViewMetrics) count(c func(*ViewMetrics) prometheus.Counter) {
	if m != nil {
		c(m).Inc()
	}
}

func lists(m *ViewMetrics) prometheus.Counter      { return m.lists }
func linkErrors(m *ViewMetrics) prometheus.Counter { return m.linkErrors }
func nodeReads(m *ViewMetrics) prometheus.Counter  { return m.nodeReads }
func suspicions(m *ViewMetrics) prometheus.Counter { return m.suspicions }

func (v *LinkView) every() time.Duration {
	if v.Every <= 0 {
		return time.Second
	}
	return v.Every
}

// Run keeps the view until ctx ends: membership every Every, links followed
// in their own goroutines, which end with it.
func (v *LinkView) Run(ctx context.Context) {
	v.mu.Lock()
	v.run = ctx
	v.mu.Unlock()
	tick := time.NewTicker(v.every())
	defer tick.Stop()
	for {
		if err := v.Refresh(ctx); err != nil && v.Log != nil && ctx.Err() == nil {
			v.Log.Warn("cluster view: cannot list members", "err", err)
		}
		select {
		case <-ctx.Done():
			v.mu.Lock()
			for id, f := range v.follow {
				f.cancel()
				delete(v.follow, id)
			}
			v.mu.Unlock()
			return
		case <-tick.C:
		}
	}
}

// Refresh reads the membership once (two lists, paginated), starts and
// stops link followers, and reads the pools the old way that need it.
func (v *LinkView) Refresh(ctx context.Context) error {
	pools, err := v.Pools.Running(ctx)
	v.Metrics.count(lists)
	if err != nil {
		return fmt.Errorf("list pools: %w", err)
	}
	nodes, err := v.Nodes.Running(ctx)
	v.Metrics.count(lists)
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	members := make(map[string]control.NodeEntry, len(nodes))
	for _, n := range nodes {
		members[n.NodeID] = n
	}
	hasPools := map[string]bool{}
	for _, p := range pools {
		hasPools[p.NodeID] = true
	}

	v.mu.Lock()
	if v.follow == nil {
		v.follow, v.fallback, v.noLink = map[string]*follower{}, map[string]placement.Candidate{}, map[string]string{}
	}
	for id, f := range v.follow {
		if f.noLink {
			v.noLink[id] = f.runID
		}
		if m, ok := members[id]; !ok || m.RunID != f.runID || m.State != node.Online || (f.noLink && !hasPools[id]) {
			f.cancel()
			delete(v.follow, id)
		}
	}
	for id, runID := range v.noLink {
		if m, ok := members[id]; !ok || m.RunID != runID {
			delete(v.noLink, id) // re-registered: it may serve a link now
		}
	}
	for id, m := range members {
		if _, followed := v.follow[id]; followed || m.State != node.Online {
			continue
		}
		if runID, ok := v.noLink[id]; ok && runID == m.RunID && !hasPools[id] {
			continue // no link and nothing to place on: nothing to read
		}
		base := v.run
		if base == nil {
			base = ctx
		}
		fctx, cancel := context.WithCancel(base)
		f := &follower{nodeID: id, runID: m.RunID, cancel: cancel, at: time.Now(), first: make(chan struct{})}
		v.follow[id] = f
		go v.followLink(fctx, f)
	}
	v.pools, v.members, v.listed = pools, members, true
	// Pools the old way: those without PoolState, and those on a node
	// that serves no link.
	var old []control.PoolEntry
	for _, p := range pools {
		if f := v.follow[p.NodeID]; !p.Listed || (f != nil && f.noLink) {
			old = append(old, p)
		}
	}
	v.observe()
	v.mu.Unlock()

	read := make(map[string]placement.Candidate, len(old))
	for _, p := range old {
		h, err := v.Pools.QueryHealth(ctx, p.WorkflowID, p.RunID)
		if err != nil {
			continue // ended meanwhile, or the query failed: its last read stands
		}
		read[p.PoolID] = placement.Candidate{PoolID: h.PoolID, NodeID: h.NodeID, ModelID: h.ModelID, URL: h.URL,
			Epoch: h.Epoch, State: h.State, Draining: h.Draining,
			SlotsTotal: h.SlotsTotal, CtxPerSlot: h.CtxSize / max(h.SlotsTotal, 1), Engine: h.Engine, Embeddings: h.Embeddings}
	}
	v.mu.Lock()
	kept := make(map[string]placement.Candidate, len(old))
	for _, p := range old {
		if c, ok := read[p.PoolID]; ok {
			kept[p.PoolID] = c
		} else if c, ok := v.fallback[p.PoolID]; ok {
			kept[p.PoolID] = c
		}
	}
	v.fallback = kept
	v.mu.Unlock()
	if v.Changed != nil {
		v.Changed()
	}
	return nil
}

// observe sets the gauges. Called with v.mu held.
func (v *LinkView) observe() {
	if v.Metrics == nil {
		return
	}
	links, age := 0, time.Duration(0)
	now := time.Now()
	for _, f := range v.follow {
		if f.noLink {
			continue
		}
		links++
		if !f.polling {
			age = max(age, now.Sub(f.at))
		}
	}
	v.Metrics.links.Set(float64(links))
	v.Metrics.age.Set(age.Seconds())
}

// followLink learns a node's link (one Get) and long-polls it until ctx
// ends. A failure retries with backoff and jitter, and learns the link
// again, since a restarted worker serves it on another port. A node
// without a link is read by Get once per Every instead.
func (v *LinkView) followLink(ctx context.Context, f *follower) {
	const first, most = 100 * time.Millisecond, 5 * time.Second
	backoff := first
	var c *link.Client
	var after uint64
	for ctx.Err() == nil {
		var err error
		if c == nil {
			c, err = v.learn(ctx, f)
			if err == nil && c == nil {
				sleep(ctx, v.every()) // no link: Get again next period
				continue
			}
		}
		var st node.LinkState
		if err == nil {
			if after == 0 {
				st, err = c.State(ctx)
			} else {
				st, err = c.Watch(ctx, after)
			}
		}
		if err == nil && st.NodeID != f.nodeID {
			err = fmt.Errorf("node link %s serves node %q, not %s", c.URL, st.NodeID, f.nodeID)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			v.Metrics.count(linkErrors)
			v.mu.Lock()
			if f.polling {
				f.at = time.Now() // an open long-poll kept the state current until now
			}
			f.polling = false
			f.settled()
			report := c != nil && transportFailure(err) && time.Since(f.suspected) >= suspectEvery
			if report {
				f.suspected = time.Now()
			}
			v.mu.Unlock()
			if report {
				v.suspect(ctx, f.nodeID, err)
			}
			if v.Log != nil && backoff == first {
				v.Log.Warn("cluster view: cannot follow node link; retrying", "node_id", f.nodeID, "err", err)
			}
			c, after = nil, 0
			sleep(ctx, backoff/2+rand.N(backoff/2+1))
			backoff = min(2*backoff, most)
			continue
		}
		backoff = first
		news := st.Version != after
		after = st.Version
		v.mu.Lock()
		f.state, f.at, f.polling = &st, time.Now(), true
		f.suspected = time.Time{} // answered: its next failure is news
		f.settled()
		v.mu.Unlock()
		if news && v.Changed != nil {
			v.Changed()
		}
	}
}

// suspectEvery bounds how often one view reports one node's failing link;
// maxSuspicions, per second, all of them.
const (
	suspectEvery  = 5 * time.Second
	maxSuspicions = 20
)

// suspect reports a node whose link failed to its workflow.
func (v *LinkView) suspect(ctx context.Context, nodeID string, cause error) {
	if v.Suspect == nil {
		return
	}
	v.suspectsOnce.Do(func() { v.suspects = rate.NewLimiter(maxSuspicions, maxSuspicions) })
	if !v.suspects.Allow() {
		return // the node's heartbeat timeout still catches it
	}
	v.Metrics.count(suspicions)
	err := v.Suspect(ctx, nodeID, node.Suspicion{By: v.Identity, Reason: cause.Error()})
	if v.Log != nil {
		if err != nil {
			v.Log.Warn("cluster view: cannot report a node's lost link", "node_id", nodeID, "err", err)
		} else {
			v.Log.Info("cluster view: node link lost; the node's workflow probes it", "node_id", nodeID, "cause", cause)
		}
	}
}

// transportFailure says the link did not answer at all (refused, reset,
// silent past the keep-alive or the wait bound): what a dead node looks
// like. An HTTP answer (a refused token, another node's link) is a
// configuration problem, not a death.
func transportFailure(err error) bool {
	var answered *apiclient.Error
	var ne net.Error
	return !errors.As(err, &answered) && (errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET))
}

// learn reads a node once for its link URL and heartbeat interval; nil
// with no error: the node serves no link (its figures are kept instead).
func (v *LinkView) learn(ctx context.Context, f *follower) (*link.Client, error) {
	nv, err := v.Nodes.Get(ctx, f.nodeID)
	v.Metrics.count(nodeReads)
	if err != nil {
		return nil, err
	}
	stale := v.Stale
	if stale <= 0 {
		stale = maxStale
		if nv.HeartbeatInterval > 0 {
			stale = min(3*nv.HeartbeatInterval, maxStale)
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	f.stale = stale
	if nv.Inventory.LinkURL == "" {
		f.noLink, f.snapshot = true, nv.LastSnapshot
		if nv.Live != nil {
			f.snapshot = *nv.Live
		}
		f.at = time.Now()
		f.settled()
		return nil, nil
	}
	f.noLink, f.url = false, nv.Inventory.LinkURL
	return &link.Client{URL: nv.Inventory.LinkURL, Token: v.Token, HTTP: v.HTTP, Wait: v.Wait}, nil
}

// maxStale bounds how long an unreachable link's state stands by default:
// a dead node is Offline sooner (its probe), a live one that this view
// cannot reach should not take tasks for long.
const maxStale = 10 * time.Second

// LinkURL is where node nodeID's link serves, as the view last learned it
// from the node's registration; false: the view follows no link of the
// node (it is not Online, or serves none).
func (v *LinkView) LinkURL(nodeID string) (string, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	f := v.follow[nodeID]
	if f == nil || f.url == "" || f.noLink {
		return "", false
	}
	return f.url, true
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// Fresh reads the membership now and answers the view: the scheduler's
// second look when its snapshot cannot serve a task (a pool just created).
// Two list calls; links are followed as always.
func (v *LinkView) Fresh(ctx context.Context) ([]placement.Candidate, error) {
	if err := v.Refresh(ctx); err != nil {
		return nil, err
	}
	// A node just followed answers within a round trip: wait for it (a
	// little), so a pool that is ready places as it did before.
	v.mu.Lock()
	var firsts []chan struct{}
	for _, f := range v.follow {
		if !f.tried {
			firsts = append(firsts, f.first)
		}
	}
	v.mu.Unlock()
	wait := time.NewTimer(freshWait)
	defer wait.Stop()
	for _, ch := range firsts {
		select {
		case <-ch:
		case <-wait.C:
			return v.Candidates(ctx)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return v.Candidates(ctx)
}

// freshWait bounds how long Fresh waits for links it has just started to
// follow.
const freshWait = time.Second

// ErrNoView: the view has read no membership yet (the scheduler waits).
var ErrNoView = errors.New("cluster view: no membership read yet")

// Candidates is the view now, from memory: every running pool, its state
// from PoolState, its engine (URL, epoch, slots) and readiness from its
// node's link with its slots busy and queued there, its node's state from
// NodeState and free VRAM from the link.
// It is a Source.
func (v *LinkView) Candidates(context.Context) ([]placement.Candidate, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.listed {
		return nil, ErrNoView
	}
	now := time.Now()
	out := make([]placement.Candidate, 0, len(v.pools))
	for _, p := range v.pools {
		online := v.members[p.NodeID].State == node.Online
		f := v.follow[p.NodeID]
		if !p.Listed || (f != nil && f.noLink) {
			c, ok := v.fallback[p.PoolID]
			if !ok {
				continue // never read yet
			}
			c.NodeOnline, c.FreeVRAM = online, f.freeVRAM(now)
			out = append(out, c)
			continue
		}
		c := placement.Candidate{PoolID: p.PoolID, NodeID: p.NodeID, ModelID: p.ModelID, State: p.State,
			Draining: p.State == pool.Draining, NodeOnline: online, FreeVRAM: f.freeVRAM(now), Embeddings: p.Embeddings}
		var lp *node.LinkPool
		if f.current(now) {
			for i := range f.state.Pools {
				if q := &f.state.Pools[i]; q.PoolID == p.PoolID && q.ModelID == p.ModelID {
					lp = q
				}
			}
		}
		switch {
		case lp != nil:
			c.URL, c.Epoch, c.SlotsTotal = lp.URL, lp.Epoch, lp.SlotsTotal
			// The node is the authority on its slots: what runs and waits.
			c.SlotsBusy, c.Queued, c.QueuedInteractive = lp.SlotsBusy, lp.Queued, lp.QueuedInteractive
			c.ServiceMs, c.Claims, c.Prefixes = lp.ServiceMs, lp.Claims, lp.Prefixes
			// The node's handoff is the readiness event; PoolState
			// shows it once visibility catches up.
			if lp.Ready && c.State == pool.Starting {
				c.State = pool.Ready
			}
			if !lp.Ready && c.State == pool.Ready {
				c.State = pool.Unready
			}
		case c.State == pool.Ready:
			// No engine on the node's link (gone, or the link is
			// unreachable too long): tasks wait rather than go there.
			c.State = pool.Unready
		}
		c.CtxPerSlot = p.CtxSize / max(c.SlotsTotal, 1)
		if p.Engine != "" {
			c.Engine = p.Engine
		}
		out = append(out, c)
	}
	return out, nil
}

// current says whether the node's link state stands: its long-poll is
// open, or it answered within Stale.
func (f *follower) current(now time.Time) bool {
	return f != nil && f.state != nil && (f.polling || now.Sub(f.at) < f.stale)
}

// freeVRAM is the node's free GPU memory, from its link (or, without one,
// its latest heartbeat); 0 when unknown.
func (f *follower) freeVRAM(now time.Time) uint64 {
	var sum uint64
	switch {
	case f == nil:
	case f.noLink:
		sum = f.snapshot.FreeVRAMBytes()
	case f.current(now):
		for _, g := range f.state.GPUs {
			sum += g.MemoryFreeBytes
		}
	}
	return sum
}
