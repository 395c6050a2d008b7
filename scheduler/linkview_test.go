package scheduler

import (
	"context"
	"fmt"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

// counting counts the Temporal calls that read one workflow or list many.
type counting struct {
	client.Client
	lists, queries, describes atomic.Int64
}

func (c *counting) ListWorkflow(ctx context.Context, r *workflowservice.ListWorkflowExecutionsRequest) (*workflowservice.ListWorkflowExecutionsResponse, error) {
	c.lists.Add(1)
	return c.Client.ListWorkflow(ctx, r)
}

func (c *counting) QueryWorkflow(ctx context.Context, id, run, q string, args ...any) (converter.EncodedValue, error) {
	c.queries.Add(1)
	return c.Client.QueryWorkflow(ctx, id, run, q, args...)
}

func (c *counting) DescribeWorkflowExecution(ctx context.Context, id, run string) (*workflowservice.DescribeWorkflowExecutionResponse, error) {
	c.describes.Add(1)
	return c.Client.DescribeWorkflowExecution(ctx, id, run)
}

// Stand-ins of the node and pool workflows under their type names: they
// publish what the real ones publish to visibility (NodeState, PoolState)
// and answer the same queries, as a signal tells them.
func standInNode(ctx workflow.Context, st node.Status) (node.Status, error) {
	if err := workflow.SetQueryHandler(ctx, node.QueryStatus, func() (node.Status, error) { return st, nil }); err != nil {
		return st, err
	}
	workflow.GetSignalChannel(ctx, "leave").Receive(ctx, nil)
	return st, nil
}

func standInPool(ctx workflow.Context, in pool.Input) (pool.Health, error) {
	h := pool.Health{PoolID: in.Spec.PoolID, NodeID: in.Spec.NodeID, ModelID: in.Spec.ModelID, State: pool.Starting, CtxSize: in.Spec.CtxSize}
	if err := workflow.SetQueryHandler(ctx, pool.QueryHealth, func() (pool.Health, error) { return h, nil }); err != nil {
		return h, err
	}
	ch := workflow.GetSignalChannel(ctx, "state")
	for {
		var s pool.State
		ch.Receive(ctx, &s)
		if s == pool.Stopped {
			return h, nil
		}
		h.State, h.Draining = s, s == pool.Draining
		if s == pool.Ready {
			h.Ready, h.URL, h.SlotsTotal, h.Epoch = true, "http://old-engine", 3, 7
		}
		if err := workflow.UpsertTypedSearchAttributes(ctx, pool.StateKey.ValueSet(string(s))); err != nil {
			return h, err
		}
	}
}

type linkNode struct {
	id  string
	src *link.Source
	srv *link.Server
}

func startLink(t *testing.T, id, token string, facts node.LinkFacts) *linkNode {
	n := &linkNode{id: id, src: link.NewSource(id)}
	n.src.Set(facts)
	n.srv = link.NewServer(n.src, link.Options{Token: token})
	require.NoError(t, n.srv.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = n.srv.Shutdown(context.Background()) })
	return n
}

func facts(poolID string, slots int, free uint64) node.LinkFacts {
	return node.LinkFacts{At: time.Now(), GPUs: []node.GPUUsage{{MemoryTotalBytes: 80 << 30, MemoryFreeBytes: free}},
		Pools: []node.LinkPool{{PoolID: poolID, ModelID: "m", Epoch: 1, URL: "http://engine-" + poolID, Ready: true, SlotsTotal: slots}}}
}

func byPool(cands []placement.Candidate) map[string]placement.Candidate {
	out := map[string]placement.Candidate{}
	for _, c := range cands {
		out[c.PoolID] = c
	}
	return out
}

// TestLinkViewFollowsNodes runs the view against the real Temporal dev
// server and two real node links: candidates appear, a change on a link
// shows within a second, a drain shows, a node that leaves drops out, an
// unreachable link's state stands for a while and then no longer places,
// and a refresh costs two list calls, never a query or describe per pool
// or node.
func TestLinkViewFollowsNodes(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tc := &counting{Client: env.Temporal}
	w := worker.New(env.Temporal, node.ControlTaskQueue, worker.Options{})
	w.RegisterWorkflowWithOptions(standInNode, workflow.RegisterOptions{Name: node.WorkflowType})
	w.RegisterWorkflowWithOptions(standInPool, workflow.RegisterOptions{Name: pool.WorkflowType})
	require.NoError(t, w.Start())
	defer w.Stop()

	const token = "view-test-token"
	links := map[string]*linkNode{
		"v-n1": startLink(t, "v-n1", token, facts("v-p1", 2, 40<<30)),
		"v-n2": startLink(t, "v-n2", token, facts("v-p2", 2, 60<<30)),
	}
	for id, l := range links {
		_, err := env.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: node.WorkflowID(id), TaskQueue: node.ControlTaskQueue,
			TypedSearchAttributes: temporal.NewSearchAttributes(node.NodeIDKey.ValueSet(id), node.NodeStateKey.ValueSet(string(node.Online)))},
			node.WorkflowType, node.Status{NodeID: id, State: node.Online, HeartbeatInterval: time.Second,
				Inventory: node.Inventory{LinkURL: link.URL("", l.srv.Addr())}})
		require.NoError(t, err)
	}
	pools := &control.Pools{Temporal: tc, Namespace: env.Namespace, DataConverter: env.DataConverter()}
	for _, s := range []pool.Spec{{PoolID: "v-p1", NodeID: "v-n1", ModelID: "m", Slots: 2, CtxSize: 4096, Engine: pool.Builtin},
		{PoolID: "v-p2", NodeID: "v-n2", ModelID: "m", Slots: 2, CtxSize: 4096, Engine: pool.Builtin}} {
		_, err := pools.Create(ctx, s)
		require.NoError(t, err)
		require.NoError(t, env.Temporal.SignalWorkflow(ctx, pool.WorkflowID(s.NodeID, s.PoolID), "", "state", pool.Ready))
	}

	reg := prometheus.NewRegistry()
	view := &LinkView{Pools: pools, Nodes: &control.Nodes{Temporal: tc, Namespace: env.Namespace, DataConverter: env.DataConverter()}, Token: token,
		Every: 200 * time.Millisecond, Stale: 1500 * time.Millisecond, Wait: 2 * time.Second, Metrics: NewViewMetrics(reg)}
	go view.Run(ctx)

	want := map[string]placement.Candidate{
		"v-p1": {PoolID: "v-p1", NodeID: "v-n1", ModelID: "m", URL: "http://engine-v-p1", Epoch: 1, State: pool.Ready,
			NodeOnline: true, SlotsTotal: 2, CtxPerSlot: 2048, Engine: pool.Builtin, FreeVRAM: 40 << 30},
		"v-p2": {PoolID: "v-p2", NodeID: "v-n2", ModelID: "m", URL: "http://engine-v-p2", Epoch: 1, State: pool.Ready,
			NodeOnline: true, SlotsTotal: 2, CtxPerSlot: 2048, Engine: pool.Builtin, FreeVRAM: 60 << 30},
	}
	view1 := func() map[string]placement.Candidate {
		cands, err := view.Candidates(ctx)
		if err != nil {
			return nil
		}
		return byPool(cands)
	}
	testenv.Eventually(t, 10*time.Second, "both pools in the view", func() (bool, string) {
		got := view1()
		return reflect.DeepEqual(got["v-p1"], want["v-p1"]) && reflect.DeepEqual(got["v-p2"], want["v-p2"]), stringOf(got)
	})
	require.Equal(t, 2.0, testutil.ToFloat64(view.Metrics.links))
	require.Equal(t, 2.0, testutil.ToFloat64(view.Metrics.nodeReads), "one Get per node, to learn its link")

	// A refresh is two list calls, whatever the cluster holds.
	tc.lists.Store(0)
	tc.queries.Store(0)
	tc.describes.Store(0)
	before := testutil.ToFloat64(view.Metrics.lists)
	time.Sleep(time.Second)
	refreshes := (testutil.ToFloat64(view.Metrics.lists) - before) / 2
	require.GreaterOrEqual(t, refreshes, 3.0)
	require.InDelta(t, 2*refreshes, float64(tc.lists.Load()), 2, "two lists per refresh")
	require.Zero(t, tc.queries.Load(), "no query per pool")
	require.Zero(t, tc.describes.Load(), "no describe per node")
	t.Logf("1 s of view: %.0f refreshes, %d list calls, %d queries, %d describes", refreshes, tc.lists.Load(), tc.queries.Load(), tc.describes.Load())

	// A slot change on a link is in the view within a second.
	changed := time.Now()
	links["v-n1"].src.Set(facts("v-p1", 4, 40<<30))
	testenv.Eventually(t, time.Second, "slot change seen within 1 s", func() (bool, string) {
		c := view1()["v-p1"]
		return c.SlotsTotal == 4 && c.CtxPerSlot == 1024, stringOf(view1())
	})
	t.Logf("slot change on the link seen after %s", time.Since(changed).Round(time.Millisecond))

	// A drained pool shows Draining (PoolState).
	require.NoError(t, env.Temporal.SignalWorkflow(ctx, pool.WorkflowID("v-n2", "v-p2"), "", "state", pool.Draining))
	testenv.Eventually(t, 15*time.Second, "drained pool shows Draining", func() (bool, string) {
		c := view1()["v-p2"]
		return c.Draining && c.State == pool.Draining, stringOf(view1())
	})

	// A pool that predates PoolState is read by one query (and only it).
	_, err := env.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: pool.WorkflowID("v-n1", "v-old"), TaskQueue: node.ControlTaskQueue,
		TypedSearchAttributes: temporal.NewSearchAttributes(pool.PoolIDKey.ValueSet("v-old"), node.NodeIDKey.ValueSet("v-n1"), model.ModelIDKey.ValueSet("m"))},
		pool.WorkflowType, pool.Input{Spec: pool.Spec{PoolID: "v-old", NodeID: "v-n1", ModelID: "m", CtxSize: 3000}})
	require.NoError(t, err)
	require.NoError(t, env.Temporal.SignalWorkflow(ctx, pool.WorkflowID("v-n1", "v-old"), "", "state", pool.Ready))
	testenv.Eventually(t, 15*time.Second, "old pool read by query", func() (bool, string) {
		c := view1()["v-old"]
		return reflect.DeepEqual(c, placement.Candidate{PoolID: "v-old", NodeID: "v-n1", ModelID: "m", URL: "http://old-engine", Epoch: 7,
			State: pool.Ready, NodeOnline: true, SlotsTotal: 3, CtxPerSlot: 1000, FreeVRAM: 40 << 30}), stringOf(view1())
	})
	tc.queries.Store(0)
	before = testutil.ToFloat64(view.Metrics.lists)
	time.Sleep(time.Second)
	refreshes = (testutil.ToFloat64(view.Metrics.lists) - before) / 2
	require.InDelta(t, refreshes, float64(tc.queries.Load()), 1, "one query per refresh, for the old pool alone")
	require.NoError(t, env.Temporal.SignalWorkflow(ctx, pool.WorkflowID("v-n1", "v-old"), "", "state", pool.Stopped))

	// A node that leaves drops out: its link is no longer followed.
	require.NoError(t, env.Temporal.SignalWorkflow(ctx, node.WorkflowID("v-n2"), "", "leave", nil))
	testenv.Eventually(t, 15*time.Second, "left node drops out", func() (bool, string) {
		c := view1()["v-p2"]
		return !c.NodeOnline && testutil.ToFloat64(view.Metrics.links) == 1, stringOf(view1())
	})

	// An unreachable link: its last state stands for Stale, then its pool
	// no longer places (tasks wait for it rather than fail).
	// lost is taken before the shutdown: the view's last contact is when
	// its long-poll broke, which is after this (CI saw a stamp taken after
	// Shutdown returned come 0.3 ms late).
	lost := time.Now()
	require.NoError(t, links["v-n1"].srv.Shutdown(context.Background()))
	testenv.Eventually(t, 15*time.Second, "link errors counted", func() (bool, string) {
		return testutil.ToFloat64(view.Metrics.linkErrors) > 0, ""
	})
	if time.Since(lost) < time.Second {
		require.Equal(t, pool.Ready, view1()["v-p1"].State, "last state stands while the link is briefly unreachable")
	}
	testenv.Eventually(t, 15*time.Second, "unreachable link's pool unready", func() (bool, string) {
		return view1()["v-p1"].State == pool.Unready, stringOf(view1())
	})
	require.GreaterOrEqual(t, time.Since(lost), 1500*time.Millisecond, "the last state stood for Stale")
	require.Greater(t, testutil.ToFloat64(view.Metrics.age), 1.0, "the view says its oldest node state is old")
	_, err = placement.Choose([]placement.Candidate{view1()["v-p1"]}, placement.Request{ModelID: "m"})
	require.ErrorIs(t, err, placement.ErrBusy, "a task waits for the pool")
}

func stringOf(m map[string]placement.Candidate) string { return fmt.Sprintf("%+v", m) }

// The merge of visibility and link: the link's word on the engine within
// the workflow's state.
func TestLinkViewMergesStateAndLink(t *testing.T) {
	now := time.Now()
	lp := node.LinkPool{PoolID: "p", ModelID: "m", Epoch: 2, URL: "http://e", SlotsTotal: 4}
	cases := []struct {
		name   string
		state  pool.State
		link   *node.LinkPool
		linkAt time.Time
		want   pool.State
		url    string
	}{
		{"starting, engine ready on the link", pool.Starting, &node.LinkPool{Ready: true}, now, pool.Ready, "http://e"},
		{"starting, no engine yet", pool.Starting, nil, now, pool.Starting, ""},
		{"ready, engine ready", pool.Ready, &node.LinkPool{Ready: true}, now, pool.Ready, "http://e"},
		{"ready, engine not ready on the link", pool.Ready, &node.LinkPool{}, now, pool.Unready, "http://e"},
		{"ready, engine gone from the link", pool.Ready, nil, now, pool.Unready, ""},
		{"ready, link state too old", pool.Ready, &node.LinkPool{Ready: true}, now.Add(-time.Minute), pool.Unready, ""},
		{"unready stays unready until the workflow says", pool.Unready, &node.LinkPool{Ready: true}, now, pool.Unready, "http://e"},
		{"draining", pool.Draining, &node.LinkPool{Ready: true}, now, pool.Draining, "http://e"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := &node.LinkState{NodeID: "n"}
			if tc.link != nil {
				p := lp
				p.Ready = tc.link.Ready
				st.Pools = []node.LinkPool{p}
			}
			v := &LinkView{listed: true,
				pools:   []control.PoolEntry{{PoolID: "p", NodeID: "n", ModelID: "m", State: tc.state, CtxSize: 8192, Listed: true}},
				members: map[string]control.NodeEntry{"n": {NodeID: "n", State: node.Online}},
				follow:  map[string]*follower{"n": {nodeID: "n", state: st, at: tc.linkAt, stale: 3 * time.Second}}}
			cands, err := v.Candidates(context.Background())
			require.NoError(t, err)
			require.Len(t, cands, 1)
			c := cands[0]
			require.Equal(t, tc.want, c.State)
			require.Equal(t, tc.url, c.URL)
			require.Equal(t, tc.state == pool.Draining, c.Draining)
			if tc.url != "" {
				require.Equal(t, 2048, c.CtxPerSlot, "ctx from the memo over the link's slots")
			}
		})
	}
}
