package apiserver_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workflows"
)

// staticKeys is a KeyLookup over a fixed map: keys with limits, without
// the key registry.
type staticKeys map[string]apikey.Principal

func (k staticKeys) Lookup(token string) (apikey.Principal, bool) {
	p, ok := k[token]
	return p, ok
}

// fakeGenerations stands in for the node's generation (the quota is what
// is under test, not the engine): each generation holds until the test
// ends it with its tokens, or fails it; a canceled task's stops.
type fakeGenerations struct {
	mu  sync.Mutex
	end map[string]chan error // task id -> its end (nil error: completed)
}

func (g *fakeGenerations) ch(id string) chan error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.end[id] == nil {
		g.end[id] = make(chan error, 1)
	}
	return g.end[id]
}

// Generate produces 3 tokens from 5 in, once told.
func (g *fakeGenerations) Generate(ctx context.Context, _ any) (task.Result, error) {
	id := activity.GetInfo(ctx).WorkflowExecution.ID
	id = strings.TrimPrefix(id, "task:")
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-g.ch(id):
			if err != nil {
				return task.Result{}, err
			}
			return task.Result{Tokens: []int32{1, 2, 3}, Pieces: []string{"a", "b", "c"}, TokensIn: 5, StopType: "limit"}, nil
		case <-ctx.Done():
			return task.Result{}, ctx.Err()
		case <-tick.C:
			activity.RecordHeartbeat(ctx)
		}
	}
}

type replica struct {
	*api
	reg    *prometheus.Registry
	quotas *control.Quotas
}

const quotaModel = "quota-model"

// startQuotaReplicas runs n apiserver replicas with their task routes, each
// with its scheduler and control worker (as `llorch apiserver` does), over
// one Ready pool whose node's generations gen holds.
func startQuotaReplicas(t *testing.T, n int, keys staticKeys, gen *fakeGenerations) []*replica {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	t.Cleanup(func() { env.TerminateRunning(t, "Task", quota.WorkflowType) })
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(ctx))
	require.NoError(t, store.PutEntry(ctx, model.Entry{ID: quotaModel, Key: "models/quota.gguf", SHA256: strings.Repeat("a", 64),
		Size: 1, Lifecycle: model.Active}))
	nodeID := testenv.Unique("nq")
	nw := worker.New(env.Temporal, node.TaskQueue(nodeID), worker.Options{})
	nw.RegisterActivityWithOptions(gen.Generate, activity.RegisterOptions{Name: "Generate"})
	require.NoError(t, nw.Start())
	t.Cleanup(nw.Stop)
	cand := []placement.Candidate{{PoolID: "pq", NodeID: nodeID, ModelID: quotaModel, URL: "http://127.0.0.1:1", Epoch: 1,
		State: pool.Ready, NodeOnline: true, SlotsTotal: 1000}}
	var out []*replica
	for i := range n {
		logs := &bytes.Buffer{}
		log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), nil)).With("replica", i)
		reg := prometheus.NewRegistry()
		nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Via: "rest", Metrics: control.NewNodeMetrics(reg)}
		tasks := &control.Tasks{Temporal: env.Temporal}
		hub := &tokenstream.Hub{}
		sched := &scheduler.Scheduler{Tasks: tasks, Log: log, Metrics: scheduler.NewMetrics(reg), Capacity: 1024,
			Source: func(context.Context) ([]placement.Candidate, error) { return cand, nil }}
		go sched.Run(ctx)
		quotas := &control.Quotas{Temporal: env.Temporal, Metrics: control.NewQuotaMetrics(reg)}
		w := workers.NewControl(env.Temporal, nil, &scheduler.TaskControl{S: sched, Hub: hub, Metrics: sched.Metrics},
			&workflows.Quotas{Counted: quotas.Metrics.Released})
		require.NoError(t, w.Start())
		t.Cleanup(w.Stop)
		s, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0", Token: token}, apiserver.Deps{
			Nodes: nodes, Registry: reg, Logger: log, Tasks: tasks, Scheduler: sched, Hub: hub, Store: store, Keys: keys, Quotas: quotas,
			Models: &control.Models{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Nodes: nodes},
		})
		require.NoError(t, err)
		require.NoError(t, s.Listen("127.0.0.1:0"))
		t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
		out = append(out, &replica{api: &api{t: t, base: "http://" + s.Addr(), logs: logs}, reg: reg, quotas: quotas})
	}
	return out
}

// race submits n tasks at once with tok, round-robin over the replicas,
// and returns the answers by task id.
func race(t *testing.T, reps []*replica, tok, prefix string, n int) map[string]resp {
	var mu sync.Mutex
	got := map[string]resp{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		id := fmt.Sprintf("%s-%d", prefix, i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r := reps[i%len(reps)].do("POST", "/v2/tasks", "Bearer "+tok, map[string]any{"task_id": id, "model": quotaModel, "prompt": "hi"})
			mu.Lock()
			got[id] = r
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	return got
}

// split checks every answer is 202 or a 429 QUOTA_EXCEEDED naming limit
// and the key, with a Retry-After of at least 1 s and at most maxRetry
// seconds, and returns the admitted ids.
func split(t *testing.T, got map[string]resp, keyID, limit string, maxRetry int) []string {
	t.Helper()
	var admitted []string
	for id, r := range got {
		switch r.status {
		case http.StatusAccepted:
			admitted = append(admitted, id)
		case http.StatusTooManyRequests:
			require.Equal(t, apiserver.CodeQuotaExceeded, r.body["code"], r.raw)
			msg, _ := r.body["message"].(string)
			require.Contains(t, msg, limit, r.raw)
			require.Contains(t, msg, keyID, r.raw)
			ra, err := strconv.Atoi(r.header.Get("Retry-After"))
			require.NoError(t, err, "Retry-After of %s: %q", id, r.header.Get("Retry-After"))
			require.GreaterOrEqual(t, ra, 1)
			require.LessOrEqual(t, ra, maxRetry)
		default:
			t.Fatalf("task %s: HTTP %d %s", id, r.status, r.raw)
		}
	}
	return admitted
}

func usageOf(t *testing.T, r *replica, tok, keyID string) quota.Usage {
	t.Helper()
	res := r.do("GET", "/v2/keys/"+keyID+"/usage", "Bearer "+tok, nil)
	require.Equal(t, 200, res.status, res.raw)
	return quota.Usage{KeyID: res.body["key_id"].(string), Metered: res.body["metered"].(bool),
		Requests: int64(res.body["requests"].(float64)), RequestsLastMinute: int(res.body["requests_last_minute"].(float64)),
		TokensIn: int64(res.body["tokens_in"].(float64)), TokensOut: int64(res.body["tokens_out"].(float64)),
		TokensInLastMinute: int(res.body["tokens_in_last_minute"].(float64)), TokensOutLastMinute: int(res.body["tokens_out_last_minute"].(float64)),
		ConcurrentTasks: int(res.body["concurrent_tasks"].(float64))}
}

// counter sums a counter's series of key keyID over every replica.
func counter(t *testing.T, reps []*replica, name, keyID string) float64 {
	t.Helper()
	sum := 0.0
	for _, r := range reps {
		mfs, err := r.reg.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				if labelOf(m, "key_id") == keyID {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// Two replicas racing: a key with concurrent_tasks=3 gets exactly 3 of 12
// racing submissions, the rest 429 QUOTA_EXCEEDED with Retry-After; its
// concurrency frees as its tasks end (completed, canceled, failed); a key
// with requests_per_minute=5 gets exactly 5 of 12, refused until the
// window frees (Retry-After up to a minute); the usage endpoint and the
// per-key counters match across replicas; a key without limits makes no
// quota round trip.
func TestQuotaRacingReplicas(t *testing.T) {
	conc, rpm, free := testenv.Unique("kc"), testenv.Unique("kr"), testenv.Unique("kf")
	keys := staticKeys{
		"tok-conc": {KeyID: conc, Name: "ci-conc", Scopes: []apikey.Scope{apikey.Inference}, Limits: apikey.Limits{ConcurrentTasks: 3}},
		"tok-rpm":  {KeyID: rpm, Name: "ci-rpm", Scopes: []apikey.Scope{apikey.Inference}, Limits: apikey.Limits{RequestsPerMinute: 5}},
		"tok-free": {KeyID: free, Name: "ci-free", Scopes: []apikey.Scope{apikey.Inference}},
	}
	gen := &fakeGenerations{end: map[string]chan error{}}
	reps := startQuotaReplicas(t, 2, keys, gen)

	// Concurrency.
	got := race(t, reps, "tok-conc", conc, 12)
	admitted := split(t, got, conc, quota.ConcurrentTasks, 1)
	require.Len(t, admitted, 3, "exactly the limit is admitted")
	u := usageOf(t, reps[1], "tok-conc", conc)
	require.True(t, u.Metered)
	require.Equal(t, 3, u.ConcurrentTasks)
	require.EqualValues(t, 3, u.Requests)
	require.Equal(t, 3, u.RequestsLastMinute)
	require.Equal(t, 3.0, counter(t, reps, "llorch_key_requests_total", conc))
	require.Equal(t, 9.0, counter(t, reps, "llorch_key_refusals_total", conc))

	// Each way a task ends frees its unit: completed, canceled, failed.
	gen.ch(admitted[0]) <- nil
	require.Equal(t, 204, reps[0].do("POST", "/v2/tasks/"+admitted[1]+"/cancel", "Bearer tok-conc", nil).status)
	gen.ch(admitted[2]) <- temporal.NewNonRetryableApplicationError("engine broke", task.ErrEngine, nil)
	testenv.Eventually(t, 30*time.Second, "the key's tasks released", func() (bool, string) {
		u := usageOf(t, reps[0], "tok-conc", conc)
		return u.ConcurrentTasks == 0, fmt.Sprintf("%+v", u)
	})
	u = usageOf(t, reps[0], "tok-conc", conc)
	require.EqualValues(t, 5, u.TokensIn, "the completed task's prompt")
	require.EqualValues(t, 3, u.TokensOut)
	require.Equal(t, 5, u.TokensInLastMinute)
	require.Equal(t, 3, u.TokensOutLastMinute)
	// Counted once, on whichever replica applied the release.
	require.Equal(t, 5.0, counter(t, reps, "llorch_key_tokens_in_total", conc))
	require.Equal(t, 3.0, counter(t, reps, "llorch_key_tokens_out_total", conc))
	env.RecordHistory(t, task.WorkflowID(admitted[0]), "", "task-quota-released")
	// Freed: admitted again.
	require.Equal(t, 202, reps[1].do("POST", "/v2/tasks", "Bearer tok-conc", map[string]any{"model": quotaModel, "prompt": "again"}).status)

	// Requests per minute.
	got = race(t, reps, "tok-rpm", rpm, 12)
	admitted = split(t, got, rpm, quota.RequestsPerMinute, 60)
	require.Len(t, admitted, 5, "exactly the limit is admitted")
	for _, r := range got {
		if r.status == 429 {
			ra, _ := strconv.Atoi(r.header.Get("Retry-After"))
			require.Greater(t, ra, 30, "the window frees its first unit most of a minute later: %s", r.raw)
		}
	}
	u = usageOf(t, reps[0], "tok-rpm", rpm)
	require.EqualValues(t, 5, u.Requests)
	require.Equal(t, 5, u.ConcurrentTasks)
	for _, id := range admitted {
		gen.ch(id) <- nil
	}
	testenv.Eventually(t, 30*time.Second, "rpm tasks released", func() (bool, string) {
		u := usageOf(t, reps[0], "tok-rpm", rpm)
		return u.ConcurrentTasks == 0, fmt.Sprintf("%+v", u)
	})
	// Ended tasks free no request: still refused within the minute.
	r := reps[1].do("POST", "/v2/tasks", "Bearer tok-rpm", map[string]any{"model": quotaModel, "prompt": "x"})
	require.Equal(t, 429, r.status, r.raw)

	// The OpenAI shape of a refusal.
	r = reps[0].do("POST", "/v1/completions", "Bearer tok-rpm", map[string]any{"model": quotaModel, "prompt": "x"})
	require.Equal(t, 429, r.status, r.raw)
	require.NotEmpty(t, r.header.Get("Retry-After"))
	e, _ := r.body["error"].(map[string]any)
	require.Equal(t, "rate_limit_exceeded", e["code"], r.raw)
	require.Contains(t, e["message"], quota.RequestsPerMinute)

	// No limits: admitted without a quota round trip (no quota workflow
	// while it runs), metered at its end: its report starts the key's
	// quota workflow and counts its request and tokens.
	freeTask := free + "-1"
	r = reps[0].do("POST", "/v2/tasks", "Bearer tok-free", map[string]any{"task_id": freeTask, "model": quotaModel, "prompt": "x"})
	require.Equal(t, 202, r.status, r.raw)
	_, err := env.Temporal.DescribeWorkflowExecution(context.Background(), quota.WorkflowID(free), "")
	var nf *serviceerror.NotFound
	require.True(t, errors.As(err, &nf), "a key without limits makes no quota round trip at admission: %v", err)
	u = usageOf(t, reps[0], "tok-free", free)
	require.False(t, u.Metered)
	gen.ch(freeTask) <- nil
	testenv.Eventually(t, 30*time.Second, "the unlimited key's task metered", func() (bool, string) {
		u := usageOf(t, reps[1], "tok-free", free)
		return u.Metered && u.Requests == 1, fmt.Sprintf("%+v", u)
	})
	u = usageOf(t, reps[1], "tok-free", free)
	require.Equal(t, quota.Usage{KeyID: free, Metered: true, Requests: 1, RequestsLastMinute: 1, TokensIn: 5, TokensOut: 3,
		TokensInLastMinute: 5, TokensOutLastMinute: 3}, u)
	require.Equal(t, 1.0, counter(t, reps, "llorch_key_requests_total", free), "counted once, where the report was applied")
	require.Equal(t, 3.0, counter(t, reps, "llorch_key_tokens_out_total", free))
	env.RecordHistory(t, task.WorkflowID(freeTask), "", "task-usage-reported")

	// Who may read usage: the key itself, an admin; not another key.
	requireError(t, reps[0].do("GET", "/v2/keys/"+conc+"/usage", "Bearer tok-free", nil), 403, "FORBIDDEN")
	require.Equal(t, 200, reps[0].do("GET", "/v2/keys/"+conc+"/usage", "Bearer "+token, nil).status)
	requireError(t, reps[0].do("GET", "/v2/keys/..%2f/usage", "Bearer "+token, nil), 400, apiserver.CodeInvalidParams)
	env.RecordHistory(t, quota.WorkflowID(conc), "", "quota-admits-releases")
}

// The cost of a quota: one admit round trip (update-with-start on the
// key's running workflow), sequentially, against the test's Temporal dev
// server. Logged for docs/security.md; the test fails if an admit fails or
// a release is not applied.
func TestQuotaAdmitRoundTrip(t *testing.T) {
	w := workers.NewControl(env.Temporal, nil, nil)
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	keyID := testenv.Unique("kt")
	t.Cleanup(func() { env.TerminateRunning(t, quota.WorkflowType) })
	q := &control.Quotas{Temporal: env.Temporal}
	ctx := context.Background()
	l := apikey.Limits{ConcurrentTasks: 1000}
	_, err := q.Admit(ctx, keyID, "warm", l) // starts the workflow
	require.NoError(t, err)
	const n = 30
	var took []time.Duration
	for i := range n {
		start := time.Now()
		isNew, err := q.Admit(ctx, keyID, fmt.Sprint("t", i), l)
		took = append(took, time.Since(start))
		require.NoError(t, err)
		require.True(t, isNew)
	}
	slices.Sort(took)
	t.Logf("quota admit round trip over %d sequential admits: p50 %s, p90 %s, max %s", n, took[n/2], took[n*9/10], took[n-1])
	require.NoError(t, q.Release(ctx, keyID, "warm"))
	testenv.Eventually(t, 10*time.Second, "release applied", func() (bool, string) {
		u, err := q.Usage(ctx, keyID)
		require.NoError(t, err)
		return u.ConcurrentTasks == n, fmt.Sprint(u.ConcurrentTasks)
	})
}

// The sweep: admissions whose task never started, or whose workflow was
// terminated by hand, are released a sweep later; a running task's stays.
func TestQuotaSweepsOrphans(t *testing.T) {
	w := workers.NewControl(env.Temporal, nil, nil)
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	keyID := testenv.Unique("ks")
	ctx := context.Background()
	live, ended, never := testenv.Unique("sweep-live"), testenv.Unique("sweep-ended"), testenv.Unique("sweep-never")
	// Task workflows no worker serves: one runs, one is terminated.
	for _, id := range []string{live, ended} {
		_, err := env.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: task.WorkflowID(id), TaskQueue: "quota-sweep-unserved"}, task.WorkflowType)
		require.NoError(t, err)
		t.Cleanup(func() { _ = env.Temporal.TerminateWorkflow(ctx, task.WorkflowID(id), "", "test over") })
	}
	t.Cleanup(func() { _ = env.Temporal.TerminateWorkflow(ctx, quota.WorkflowID(keyID), "", "test over") })
	q := &control.Quotas{Temporal: env.Temporal, SweepAfter: time.Second}
	l := apikey.Limits{ConcurrentTasks: 3}
	for _, id := range []string{never, live, ended} {
		_, err := q.Admit(ctx, keyID, id, l)
		require.NoError(t, err)
	}
	require.NoError(t, env.Temporal.TerminateWorkflow(ctx, task.WorkflowID(ended), "", "by hand"))
	_, err := q.Admit(ctx, keyID, "one-more", l)
	var ex *control.ExceededError
	require.True(t, errors.As(err, &ex), "full: %v", err)
	testenv.Eventually(t, 30*time.Second, "the orphans released", func() (bool, string) {
		u, err := q.Usage(ctx, keyID)
		require.NoError(t, err)
		return u.ConcurrentTasks == 1, fmt.Sprintf("%+v", u)
	})
	v, err := env.Temporal.QueryWorkflow(ctx, quota.WorkflowID(keyID), "", quota.QueryState)
	require.NoError(t, err)
	var st quota.State
	require.NoError(t, v.Get(&st))
	require.True(t, st.Holds(live), "the running task keeps its unit: %+v", st.InFlight)
	require.False(t, st.InFlight[0].Checked.IsZero(), "found running by a sweep")
	isNew, err := q.Admit(ctx, keyID, "one-more", l)
	require.NoError(t, err)
	require.True(t, isNew)
	env.RecordHistory(t, quota.WorkflowID(keyID), "", "quota-swept-orphans")
}
