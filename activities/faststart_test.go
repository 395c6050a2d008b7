package activities_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/engine/protocol"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
)

// fastNode is a node's generation side over one real built-in engine.
type fastNode struct {
	g       *activities.GenerateActivities
	fs      activities.FastStart
	where   task.Where
	metrics *activities.TaskMetrics
}

func newFastNode(t *testing.T, claimWithin time.Duration) *fastNode {
	t.Helper()
	f := newEngineFixture(t)
	spec := f.spec(t)
	spec.CtxSize = 4096
	h := f.start(t, spec, 1)
	m := activities.NewTaskMetrics(prometheus.NewRegistry())
	g := &activities.GenerateActivities{NodeID: "node-e", Streams: &tokenstream.Hub{}, Metrics: m, ClaimWithin: claimWithin}
	return &fastNode{g: g, fs: activities.FastStart{G: g}, metrics: m,
		where: task.Where{NodeID: "node-e", PoolID: spec.PoolID, URL: h.URL, Epoch: 1}}
}

func (n *fastNode) request(id string, maxTokens int) task.Request {
	w := n.where
	return task.Request{TaskID: id, ModelID: "tiny", Prompt: "Once upon a time", Priority: task.Interactive,
		Params: task.Params{MaxTokens: maxTokens, Temperature: 0, TopK: 1, TopP: 1, Seed: 1}, EnqueuedAt: time.Now(), FastStart: &w}
}

// generate runs the Generate activity as the task workflow does.
func (n *fastNode) generate(t *testing.T, in activities.GenerateInput) (task.Result, error) {
	t.Helper()
	var s testsuite.WorkflowTestSuite
	env := s.NewTestActivityEnvironment()
	env.RegisterActivity(n.g)
	env.SetTestTimeout(2 * time.Minute)
	v, err := env.ExecuteActivity(n.g.Generate, in)
	if err != nil {
		return task.Result{}, err
	}
	var res task.Result
	require.NoError(t, v.Get(&res))
	return res, nil
}

// tokens reads the node stream of a task to its end: its token pieces and
// the final event.
func (n *fastNode) tokens(t *testing.T, id string) ([]string, task.Event) {
	t.Helper()
	var st *tokenstream.Stream
	testenv.Eventually(t, 10*time.Second, "the node stream of "+id, func() (bool, string) {
		st = n.g.Streams.Peek(id)
		return st != nil, ""
	})
	var pieces []string
	cur := tokenstream.Cursor{}
	deadline := time.After(time.Minute)
	for {
		evs, next, changed := st.Read(cur)
		cur = next
		for _, ev := range evs {
			switch ev.Type {
			case "token":
				pieces = append(pieces, ev.T)
			case "end", "error":
				return pieces, ev
			}
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("the node stream of %s did not end", id)
		}
	}
}

func (n *fastNode) generated() float64 {
	return testutil.ToFloat64(n.metrics.TokensOut.WithLabelValues("node-e"))
}

func (n *fastNode) outcome(o string) float64 {
	return testutil.ToFloat64(n.metrics.FastStarts.WithLabelValues("node-e", o))
}

// A generation started ahead of its workflow runs once: the Generate
// activity that comes for it (before or after it ended) returns its
// result, the engine decoded its tokens once, and a second start of the
// task is refused, then and after it ended.
func TestFastStartClaimedRunsOnce(t *testing.T) {
	n := newFastNode(t, time.Minute)
	req := n.request("t-fast-1", 24)
	require.NoError(t, n.fs.StartEarly(req))
	pieces, final := n.tokens(t, req.TaskID)
	require.Equal(t, "end", final.Type, "%+v", final.Error)
	require.Len(t, pieces, 24)
	require.ErrorIs(t, n.fs.StartEarly(req), node.ErrGenerationExists, "a second start while it waits for its activity")

	res, err := n.generate(t, activities.GenerateInput{Request: req, Where: n.where, Attach: true})
	require.NoError(t, err)
	assert.Equal(t, pieces, res.Pieces, "the activity returns the generation that ran ahead")
	assert.Equal(t, 24.0, n.generated(), "decoded once")
	assert.Equal(t, 1.0, n.outcome("claimed"))
	require.ErrorIs(t, n.fs.StartEarly(req), node.ErrGenerationExists, "a late start after it ended is refused too")
	assert.Equal(t, 2.0, n.outcome("refused"))

	// A start for another node, or with no slot, is refused.
	other := n.request("t-fast-2", 4)
	other.FastStart.NodeID = "node-x"
	require.ErrorIs(t, n.fs.StartEarly(other), node.ErrNotThisNode)
	other.FastStart = nil
	require.ErrorIs(t, n.fs.StartEarly(other), node.ErrNotThisNode)
}

// promptLen is the prompt's length in tokens as the engine tokenizes it.
func (n *fastNode) promptLen(t *testing.T, prompt string) int {
	t.Helper()
	toks, err := protocol.Client{URL: n.where.URL}.Tokenize(context.Background(), protocol.TokenizeRequest{Content: prompt, AddSpecial: true})
	require.NoError(t, err)
	return len(toks)
}

// An activity that comes before its fast start is the generation: the
// start, arriving late, is refused and nothing runs twice. Its prompt
// went as text, and its length came back with the end.
func TestFastStartActivityFirst(t *testing.T) {
	n := newFastNode(t, time.Minute)
	req := n.request("t-first", 16)
	res, err := n.generate(t, activities.GenerateInput{Request: req, Where: n.where, Attach: true})
	require.NoError(t, err)
	require.Len(t, res.Tokens, 16)
	assert.Equal(t, n.promptLen(t, req.Prompt), res.TokensIn)
	require.ErrorIs(t, n.fs.StartEarly(req), node.ErrGenerationExists)
	assert.Equal(t, 16.0, n.generated())
	assert.Zero(t, n.outcome("claimed"))
}

// A generation nobody claims within the bound is cancelled, its stream
// left open; the activity that comes later resumes from its tokens in the
// same stream: the reader sees every token once, in order, and the whole
// output is what an uninterrupted greedy generation gives.
func TestFastStartAbandonedThenResumed(t *testing.T) {
	n := newFastNode(t, 150*time.Millisecond)
	// A slot holds 2048 tokens (the pool's 4096 over 2 slots).
	const want = 1500
	ref, err := n.generate(t, activities.GenerateInput{Request: n.request("t-ref", want), Where: n.where})
	require.NoError(t, err)
	require.Equal(t, want, len(ref.Tokens))

	req := n.request("t-abandoned", want)
	require.NoError(t, n.fs.StartEarly(req))
	testenv.Eventually(t, 30*time.Second, "the unclaimed generation cancelled", func() (bool, string) {
		return n.outcome("abandoned") == 1, ""
	})
	st := n.g.Streams.Peek(req.TaskID)
	require.NotNil(t, st)
	assert.False(t, st.Ended(), "its stream stays open for the activity that comes later")
	before := st.Tokens()
	require.Less(t, before, want, "cancelled before it ended (its tokens take longer than the bound)")

	done := make(chan []string, 1)
	go func() { pieces, _ := n.tokens(t, req.TaskID); done <- pieces }()
	res, err := n.generate(t, activities.GenerateInput{Request: req, Where: n.where, Attach: true})
	require.NoError(t, err)
	assert.Equal(t, ref.Pieces, res.Pieces, "resumed greedy output equals the uninterrupted one")
	assert.Equal(t, ref.TokensIn, res.TokensIn, "the resumed run, sent as token ids, counts the same prompt")
	assert.Equal(t, n.promptLen(t, req.Prompt), res.TokensIn)
	assert.Equal(t, ref.Pieces, <-done, "the reader of the stream saw every token once, in order")
	// The counter takes a generation's tokens when it ends: the reference's,
	// and the resumed run's new ones (none of those the cancelled run made).
	evs, _, _ := n.g.Streams.Peek(req.TaskID).Read(tokenstream.Cursor{})
	at := -1
	for _, ev := range evs {
		if v, ok := ev.Metrics["resumed_at_token"].(int); ok {
			at = v
		}
	}
	require.GreaterOrEqual(t, at, before, "the resumed run said where it went on")
	assert.Equal(t, float64(want+want-at), n.generated(), "the resumed run decoded only the tokens after the cancelled one's")
}

// A fast start called off (its workflow did not start, or the task was
// canceled) stops at once and ends its stream with CANCELED; one that an
// activity claimed is the activity's to stop.
func TestFastStartCanceled(t *testing.T) {
	n := newFastNode(t, time.Minute)
	req := n.request("t-off", 3000)
	require.NoError(t, n.fs.StartEarly(req))
	require.True(t, n.fs.CancelEarly(req.TaskID, "its workflow did not start"))
	_, final := n.tokens(t, req.TaskID)
	require.Equal(t, "error", final.Type)
	assert.Equal(t, task.ErrCanceled, final.Error.Code)
	assert.False(t, n.fs.CancelEarly(req.TaskID, "again"))
	assert.False(t, n.fs.CancelEarly("t-none", "never started"))
	assert.Equal(t, 1.0, n.outcome("canceled"))

	claimed := n.request("t-claimed", 64)
	require.NoError(t, n.fs.StartEarly(claimed))
	res, err := n.generate(t, activities.GenerateInput{Request: claimed, Where: n.where, Attach: true})
	require.NoError(t, err)
	require.Len(t, res.Tokens, 64)
	assert.False(t, n.fs.CancelEarly(claimed.TaskID, "too late"))
}

// The node link serves the fast start: 202, 409 for a second one, 400 for
// a body that is not the path's task; the generation's events come on the
// task's stream.
func TestFastStartOverTheLink(t *testing.T) {
	n := newFastNode(t, time.Minute)
	src := link.NewSource("node-e")
	srv := link.NewServer(src, link.Options{Streams: n.g.Streams, Generator: n.fs})
	require.NoError(t, srv.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	c := &link.Client{URL: srv.URL("")}
	req := n.request("t-link", 8)
	require.NoError(t, c.Generate(context.Background(), req))
	err := c.Generate(context.Background(), req)
	require.Error(t, err)
	assert.Contains(t, err.Error(), node.CodeGenerationExists)
	bad := n.request("t-link-2", 8)
	bad.FastStart.NodeID = "elsewhere"
	err = c.Generate(context.Background(), bad)
	require.Error(t, err)
	assert.True(t, strings.Contains(err.Error(), "fast_start"), err.Error())

	var got []task.Event
	require.NoError(t, c.Events(context.Background(), req.TaskID, -1, func(ev task.Event) error {
		got = append(got, ev)
		return nil
	}))
	require.NotEmpty(t, got)
	assert.Equal(t, "end", got[len(got)-1].Type)
	tokens := 0
	for _, ev := range got {
		if ev.Type == "token" {
			tokens++
		}
	}
	assert.Equal(t, 8, tokens)
}
