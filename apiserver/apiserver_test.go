package apiserver_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workers/agent"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

const token = "s3cret-token-for-tests"

type api struct {
	t      *testing.T
	base   string
	logs   *bytes.Buffer
	routes []fiber.Route // the server's routes, where a test reads them
}

// startAPI runs the apiserver and a control worker in-process against the
// package's real Temporal server.
func startAPI(t *testing.T) *api {
	t.Helper()
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), nil))
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	w := workers.NewControl(env.Temporal, &activities.CatalogActivities{Store: store}, nil)
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	reg := prometheus.NewRegistry()
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Via: "rest", Metrics: control.NewNodeMetrics(reg)}
	s, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0", Token: token}, apiserver.Deps{
		Nodes: nodes, Store: store, Registry: reg, Logger: log, Pools: &control.Pools{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()},
		Models: &control.Models{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Nodes: nodes},
	})
	require.NoError(t, err)
	require.NoError(t, s.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return &api{t: t, base: "http://" + s.Addr(), logs: logs}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	if testing.Verbose() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

type resp struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

func (a *api) do(method, path, auth string, body any) resp {
	a.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		buf, err := json.Marshal(b)
		require.NoError(a.t, err)
		rd = bytes.NewReader(buf)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	require.NoError(a.t, err)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(a.t, err)
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := resp{status: res.StatusCode, header: res.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

func (a *api) call(method, path string, body any) resp {
	return a.do(method, path, "Bearer "+token, body)
}

func requireError(t *testing.T, r resp, status int, code string) {
	t.Helper()
	require.Equal(t, status, r.status, r.raw)
	require.Equal(t, code, r.body["code"], r.raw)
	require.NotEmpty(t, r.body["message"], r.raw)
	require.NotEmpty(t, r.header.Get("X-Correlation-Id"))
}

func (a *api) state(id string) string {
	r := a.call("GET", "/v2/nodes/"+id, nil)
	if r.status != 200 {
		return fmt.Sprintf("HTTP %d %s", r.status, r.raw)
	}
	return r.body["state"].(string)
}

func (a *api) waitState(id string, want node.State, timeout time.Duration) {
	a.t.Helper()
	testenv.Eventually(a.t, timeout, "node "+id+" "+string(want), func() (bool, string) {
		s := a.state(id)
		return s == string(want), s
	})
}

func TestAuth(t *testing.T) {
	a := startAPI(t)
	requireError(t, a.do("GET", "/v2/nodes", "", nil), 401, apiserver.CodeMissingToken)
	requireError(t, a.do("GET", "/v2/nodes", "Bearer nope", nil), 401, apiserver.CodeBadToken)
	requireError(t, a.do("GET", "/v2/nodes", "Basic "+token, nil), 401, apiserver.CodeBadToken)
	requireError(t, a.do("GET", "/v2/nodes", "Bearer "+token+"x", nil), 401, apiserver.CodeBadToken)
	requireError(t, a.do("POST", "/v2/nodes/register", "", map[string]any{"node_id": "x"}), 401, apiserver.CodeMissingToken)
	require.Equal(t, 200, a.call("GET", "/v2/nodes", nil).status)

	// /health and /metrics are open.
	require.Equal(t, 200, a.do("GET", "/health", "", nil).status)
	m := a.do("GET", "/metrics", "", nil)
	require.Equal(t, 200, m.status)
	require.Contains(t, m.raw, `llorch_api_auth_failures_total{code="BAD_TOKEN"} 3`)
	require.Contains(t, m.raw, `llorch_api_auth_failures_total{code="MISSING_TOKEN"} 2`)

	// The token never appears in logs, errors or metrics; its identity does.
	require.NotContains(t, a.logs.String(), token)
	require.NotContains(t, m.raw, token)
	require.Contains(t, a.logs.String(), bearer.Fingerprint(token))
	require.Regexp(t, `^token:[0-9a-f]{6}$`, bearer.Fingerprint(token))
}

func TestRefusesPublicBindWithoutToken(t *testing.T) {
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()}
	for _, addr := range []string{"0.0.0.0:8080", ":8080", "10.1.2.3:8080"} {
		_, err := apiserver.New(apiserver.Config{Addr: addr}, apiserver.Deps{Nodes: nodes, Registry: prometheus.NewRegistry(), Logger: slog.Default()})
		require.ErrorContains(t, err, "without a token", addr)
	}
	_, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0"}, apiserver.Deps{Nodes: nodes, Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(t, err)
}

func TestCorrelationID(t *testing.T) {
	a := startAPI(t)
	req, _ := http.NewRequest("GET", a.base+"/v2/nodes", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("X-Correlation-Id", "req-42")
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, "req-42", res.Header.Get("X-Correlation-Id"))
	require.Contains(t, a.logs.String(), "correlation_id=req-42")
	// An unusable id is replaced, not echoed.
	req.Header.Set("X-Correlation-Id", "bad id\twith spaces")
	res, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	res.Body.Close()
	require.Regexp(t, `^[0-9a-f-]{36}$`, res.Header.Get("X-Correlation-Id"))
}

func TestBadInput(t *testing.T) {
	a := startAPI(t)
	cases := []struct {
		name, method, path string
		body               any
		field              string
	}{
		{"empty register", "POST", "/v2/nodes/register", nil, "body"},
		{"malformed json", "POST", "/v2/nodes/register", `{"node_id":`, "body"},
		{"unknown field", "POST", "/v2/nodes/register", map[string]any{"node_id": "a1", "colour": "red"}, "colour"},
		{"wrong type", "POST", "/v2/nodes/register", map[string]any{"node_id": 7}, "node_id"},
		{"missing id", "POST", "/v2/nodes/register", map[string]any{"machine_id": "m"}, "node_id"},
		{"bad id", "POST", "/v2/nodes/register", map[string]any{"node_id": "../etc"}, "node_id"},
		{"interval too short", "POST", "/v2/nodes/register", map[string]any{"node_id": "a1", "heartbeat_interval_ms": 5}, "heartbeat_interval_ms"},
		{"free above total", "POST", "/v2/nodes/register", map[string]any{"node_id": "a1",
			"gpus": []map[string]any{{"index": 0, "memory_total_bytes": 10, "memory_free_bytes": 11}}}, "gpus[0].memory_free_bytes"},
		{"duplicate gpu", "POST", "/v2/nodes/register", map[string]any{"node_id": "a1",
			"gpus": []map[string]any{{"index": 0}, {"index": 0}}}, "gpus[1].index"},
		{"bad pool", "POST", "/v2/nodes/register", map[string]any{"node_id": "a1",
			"pools": []map[string]any{{"pool_id": "p", "slots_total": 1, "slots_free": 2}}}, "pools[0].slots_free"},
		{"trailing data", "POST", "/v2/nodes/register", `{"node_id":"a1"} {}`, "body"},
		{"bad id in path", "GET", "/v2/nodes/UPPER", nil, "id"},
		{"bad state filter", "GET", "/v2/nodes?state=sleeping", nil, "state"},
		{"long reason", "POST", "/v2/nodes/a1/drain", map[string]any{"reason": strings.Repeat("x", 600)}, "reason"},
		{"heartbeat util", "POST", "/v2/nodes/a1/heartbeat", map[string]any{"gpus": []map[string]any{{"index": 0, "utilization_percent": 101}}}, "gpus[0].utilization_percent"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := a.call(c.method, c.path, c.body)
			requireError(t, r, 400, apiserver.CodeInvalidParams)
			require.Equal(t, c.field, r.body["field"], r.raw)
		})
	}
	r := a.do("POST", "/v2/nodes/register", "Bearer "+token, nil)
	requireError(t, r, 400, apiserver.CodeInvalidParams)
	// Unknown routes and nodes use the envelope too.
	requireError(t, a.call("GET", "/v2/nope", nil), 404, apiserver.CodeNotFound)
	for _, p := range []struct{ method, path string }{
		{"GET", "/v2/nodes/ghost"}, {"DELETE", "/v2/nodes/ghost"}, {"POST", "/v2/nodes/ghost/drain"},
		{"POST", "/v2/nodes/ghost/undrain"}, {"POST", "/v2/nodes/ghost/heartbeat"},
	} {
		requireError(t, a.call(p.method, p.path, nil), 404, apiserver.CodeNodeNotFound)
	}
}

// A REST agent: register, heartbeat (live figures fresh), drain, undrain,
// silence (Offline), heartbeat again (Online), deregister (Left).
func TestHTTPAgentLifecycle(t *testing.T) {
	a := startAPI(t)
	id := "ext-http-1"
	reg := map[string]any{
		"node_id": id, "machine_id": "machine-b", "address": "10.0.0.5:9200", "heartbeat_interval_ms": 300,
		"gpus": []map[string]any{{"index": 0, "uuid": "GPU-1", "name": "NVIDIA H100 80GB HBM3",
			"memory_total_bytes": 80 << 30, "memory_free_bytes": 70 << 30, "compute_capability": "9.0"}},
		"pools": []map[string]any{{"pool_id": "pool-a", "ready": true, "slots_total": 4, "slots_free": 4}},
	}
	r := a.call("POST", "/v2/nodes/register", reg)
	require.Equal(t, 202, r.status, r.raw)
	require.Equal(t, "node:"+id, r.body["workflow_id"])
	require.EqualValues(t, 900, r.body["liveness_timeout_ms"])
	a.waitState(id, node.Online, 30*time.Second)

	beat := func(free uint64, slotsFree int) resp {
		return a.call("POST", "/v2/nodes/"+id+"/heartbeat", map[string]any{
			"gpus":  []map[string]any{{"index": 0, "memory_total_bytes": 80 << 30, "memory_free_bytes": free}},
			"pools": []map[string]any{{"pool_id": "pool-a", "ready": true, "slots_total": 4, "slots_free": slotsFree}},
		})
	}
	require.Equal(t, 200, beat(50<<30, 1).status)
	// The figures the control plane sees follow the heartbeats.
	testenv.Eventually(t, 5*time.Second, "live figures follow heartbeats", func() (bool, string) {
		beat(50<<30, 1)
		r := a.call("GET", "/v2/nodes/"+id, nil)
		live, _ := r.body["live"].(map[string]any)
		if live == nil {
			return false, r.raw
		}
		pools := live["pools"].([]any)
		return live["source"] == "heartbeat" && live["free_vram_bytes"] == float64(50<<30) &&
			len(pools) == 1 && pools[0].(map[string]any)["slots_free"] == float64(1), r.raw
	})

	// Keep the node beating while drain is checked: a stall of 900 ms on a
	// loaded machine would otherwise make it Offline mid-check.
	stopBeats := make(chan struct{})
	beatsDone := make(chan struct{})
	go func() {
		defer close(beatsDone)
		for {
			select {
			case <-stopBeats:
				return
			case <-time.After(100 * time.Millisecond):
				beat(50<<30, 1)
			}
		}
	}()
	r = a.call("POST", "/v2/nodes/"+id+"/drain", map[string]any{"reason": "maintenance"})
	require.Equal(t, 200, r.status, r.raw)
	require.Equal(t, "Draining", r.body["state"])
	require.True(t, r.body["draining"].(bool))
	// Drain is idempotent.
	require.Equal(t, "Draining", a.call("POST", "/v2/nodes/"+id+"/drain", nil).body["state"])
	r = a.call("GET", "/v2/nodes?state=draining", nil)
	require.Contains(t, r.raw, id)
	require.NotContains(t, a.call("GET", "/v2/nodes?state=online", nil).raw, `"node_id":"`+id+`"`)
	require.Equal(t, "Online", a.call("POST", "/v2/nodes/"+id+"/undrain", nil).body["state"])
	close(stopBeats)
	<-beatsDone

	// Silence: no beat for 3 intervals means Offline.
	a.waitState(id, node.Offline, 30*time.Second)
	r = a.call("GET", "/v2/nodes/"+id, nil)
	transitions := r.body["transitions"].([]any)
	require.Contains(t, transitions[len(transitions)-1].(map[string]any)["reason"], "no heartbeat for 900ms")
	r = beat(60<<30, 4)
	require.Equal(t, 200, r.status, r.raw)
	require.Equal(t, true, r.body["revived"])
	a.waitState(id, node.Online, 30*time.Second)

	r = a.call("DELETE", "/v2/nodes/"+id, map[string]any{"reason": "decommissioned"})
	require.Equal(t, 200, r.status, r.raw)
	require.Equal(t, "Left", r.body["state"])
	require.Equal(t, "Left", a.state(id))
	requireError(t, beat(1, 1), 409, apiserver.CodeNodeLeft)
	requireError(t, a.call("POST", "/v2/nodes/"+id+"/drain", nil), 409, apiserver.CodeNodeLeft)
	require.Contains(t, a.call("GET", "/v2/nodes?state=left", nil).raw, id)

	// Registering again brings it back as a new run.
	require.Equal(t, 202, a.call("POST", "/v2/nodes/register", reg).status)
	a.waitState(id, node.Online, 30*time.Second)
	require.Equal(t, 200, a.call("DELETE", "/v2/nodes/"+id, nil).status)

	m := a.do("GET", "/metrics", "", nil).raw
	require.Contains(t, m, `llorch_node_registrations_total{node_id="`+id+`",via="rest"} 2`)
	require.Contains(t, m, `llorch_node_deregistrations_total{node_id="`+id+`",via="rest"} 2`)
	require.Regexp(t, `llorch_node_rest_heartbeats_total\{node_id="`+id+`"\} \d+`, m)
}

// A node run by an in-process agent on a mock DGX H100: inventory comes from
// NVML, REST heartbeats are refused, freshness of the live figures holds.
func TestWorkerAgentNode(t *testing.T) {
	a := startAPI(t)
	lib, err := inventory.Mock("dgxh100")
	require.NoError(t, err)
	host, err := inventory.New(inventory.Options{NVML: lib, ModelDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(t, err)
	id := "agent-api-1"
	agent := &agent.Agent{
		NodeID: id, Identity: "worker:" + id, HeartbeatInterval: 200 * time.Millisecond, Host: host,
		Nodes:   &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()},
		Log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Metrics: activities.NewNodeMetrics(prometheus.NewRegistry()),
	}
	ctx := context.Background()
	require.NoError(t, agent.Start(ctx))
	a.waitState(id, node.Online, 30*time.Second)

	r := a.call("GET", "/v2/nodes/"+id, nil)
	inv := r.body["inventory"].(map[string]any)
	require.Len(t, inv["gpus"], 8)
	require.Equal(t, "NVIDIA H100 80GB HBM3", inv["gpus"].([]any)[0].(map[string]any)["name"])
	testenv.Eventually(t, 5*time.Second, "live figures within 5 s", func() (bool, string) {
		r := a.call("GET", "/v2/nodes/"+id, nil)
		live, _ := r.body["live"].(map[string]any)
		return live != nil && live["source"] == "heartbeat" && live["age_ms"].(float64) < 5000, r.raw
	})
	requireError(t, a.call("POST", "/v2/nodes/"+id+"/heartbeat", nil), 409, apiserver.CodeAgentManaged)

	// The one-line summary in the Temporal UI names GPU count and model.
	desc, err := env.Temporal.DescribeWorkflowExecution(ctx, node.WorkflowID(id), "")
	require.NoError(t, err)
	require.NotNil(t, desc.GetExecutionConfig().GetUserMetadata().GetSummary())
	var summary string
	require.NoError(t, env.DataConverter().FromPayload(desc.GetExecutionConfig().GetUserMetadata().GetSummary(), &summary))
	require.Equal(t, "node "+id+" · 8× NVIDIA H100 80GB HBM3", summary)

	// Typed search attributes find it by state.
	testenv.Eventually(t, 10*time.Second, "visible by NodeState", func() (bool, string) {
		n, err := env.Temporal.CountWorkflow(ctx, countReq(env.Namespace, `NodeState="Online" AND NodeId="`+id+`"`))
		return err == nil && n.GetCount() == 1, fmt.Sprint(n, err)
	})

	require.NoError(t, agent.Stop(ctx))
	require.Equal(t, "Left", a.state(id))
}

// Racing registrations of one node (restarted workers, retries) join one
// workflow; they never start a second.
func TestRacingRegistrationsMakeOneWorkflow(t *testing.T) {
	startAPI(t)
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()}
	id := fmt.Sprintf("race-%d", time.Now().UnixNano()%1e9) // fresh on every -count
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- nodes.Register(ctx, node.Registration{NodeID: id, Agent: node.AgentHTTP,
				Identity: fmt.Sprintf("racer-%d", i), HeartbeatInterval: time.Second})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	testenv.Eventually(t, 10*time.Second, "exactly one run of node:"+id, func() (bool, string) {
		n, err := env.Temporal.CountWorkflow(ctx, countReq(env.Namespace, `WorkflowId="node:`+id+`"`))
		return err == nil && n.GetCount() == 1, fmt.Sprint(n, err)
	})
	_, err := nodes.Update(ctx, id, node.UpdateDeregister, node.Request{})
	require.NoError(t, err)
}

// The catalog API end to end on a real bucket: registration by key and by
// upload, no-op and refusal of other content, validation of ids and keys,
// lifecycle, verify, delete.
func TestCatalogAPI(t *testing.T) {
	a := startAPI(t)
	ctx := context.Background()
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	dir := t.TempDir()
	put := func(key string, seed int64) string {
		path := filepath.Join(dir, key[strings.LastIndex(key, "/")+1:])
		require.NoError(t, modelstore.WriteTinyFile(path, modelstore.TinyOptions{Seed: seed}))
		f, err := os.Open(path)
		require.NoError(t, err)
		defer f.Close()
		sha, err := store.Upload(ctx, f, -1, key, nil)
		require.NoError(t, err)
		return sha
	}
	// Start from an empty catalog, so the test holds on a re-run (-count).
	old, err := store.ListEntries(ctx)
	require.NoError(t, err)
	for _, e := range old {
		require.NoError(t, store.DeleteEntry(ctx, e.ID))
	}
	shaA := put("models/api-a.gguf", 1)

	for _, c := range []struct {
		body  any
		field string
	}{
		{map[string]any{"id": "../x", "key": "models/a.gguf"}, "id"},
		{map[string]any{"id": "ok", "key": "/etc/passwd"}, "key"},
		{map[string]any{"id": "ok", "key": "models/../catalog/x.json"}, "key"},
		{map[string]any{"id": "ok", "key": "catalog/ok.json"}, "key"},
		{map[string]any{"id": "ok", "key": strings.Repeat("k", 600)}, "key"},
		{map[string]any{"id": strings.Repeat("a", 200)}, "id"},
		{map[string]any{"id": "ok", "sha256": "xyz"}, "sha256"},
		{map[string]any{"id": "ok", "colour": 1}, "colour"},
	} {
		r := a.call("POST", "/v2/catalog/models", c.body)
		requireError(t, r, 400, apiserver.CodeInvalidParams)
		require.Equal(t, c.field, r.body["field"], r.raw)
	}
	requireError(t, a.call("POST", "/v2/catalog/models", map[string]any{"id": "missing", "key": "models/none.gguf"}), 404, apiserver.CodeObjectNotFound)
	_, err = store.Upload(ctx, strings.NewReader("PK\x03\x04 not a model at all"), -1, "models/zip.gguf", nil)
	require.NoError(t, err)
	r := a.call("POST", "/v2/catalog/models", map[string]any{"id": "zip", "key": "models/zip.gguf"})
	requireError(t, r, 400, apiserver.CodeNotGGUF)
	require.Contains(t, r.body["message"], "not a GGUF")
	requireError(t, a.call("GET", "/v2/catalog/models/zip", nil), 404, apiserver.CodeModelNotFound)

	r = a.call("POST", "/v2/catalog/models", map[string]any{"id": "api-a", "key": "models/api-a.gguf", "sha256": shaA})
	require.Equal(t, 201, r.status, r.raw)
	require.Equal(t, shaA, r.body["sha256"])
	meta := r.body["metadata"].(map[string]any)
	require.Equal(t, "llama", meta["architecture"])
	require.Greater(t, meta["estimated_vram_bytes"], float64(0))
	// Same content again: a no-op. A wrong digest: refused.
	r = a.call("POST", "/v2/catalog/models", map[string]any{"id": "api-a", "key": "models/api-a.gguf"})
	require.Equal(t, 200, r.status, r.raw)
	require.Equal(t, "true", r.header.Get("X-Llorch-Unchanged"))
	requireError(t, a.call("POST", "/v2/catalog/models", map[string]any{"id": "api-b", "key": "models/api-a.gguf"}), 409, apiserver.CodeKeyInUse)

	// Upload through the API: other content under an existing id is refused
	// without replace and leaves the registered object untouched.
	other := filepath.Join(dir, "other.gguf")
	require.NoError(t, modelstore.WriteTinyFile(other, modelstore.TinyOptions{Seed: 2}))
	body, err := os.ReadFile(other)
	require.NoError(t, err)
	upload := func(q string) resp {
		req, _ := http.NewRequest("POST", a.base+"/v2/catalog/models?"+q, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/octet-stream")
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer res.Body.Close()
		raw, _ := io.ReadAll(res.Body)
		out := resp{status: res.StatusCode, header: res.Header, raw: string(raw)}
		_ = json.Unmarshal(raw, &out.body)
		return out
	}
	requireError(t, upload("id=api-a&key=models/api-a.gguf"), 409, apiserver.CodeModelExists)
	sha, _, err := store.HashObject(ctx, "models/api-a.gguf")
	require.NoError(t, err)
	require.Equal(t, shaA, sha, "a refused upload never overwrites the registered object")
	r = upload("id=api-up&key=models/api-up.gguf")
	require.Equal(t, 201, r.status, r.raw)
	r = upload("id=api-a&key=models/api-a.gguf&replace=true")
	require.Equal(t, 201, r.status, r.raw)
	require.NotEqual(t, shaA, r.body["sha256"])

	// Lifecycle, verify, list, delete.
	requireError(t, a.call("POST", "/v2/catalog/models/api-a/state", map[string]any{"state": "Sleeping"}), 400, apiserver.CodeInvalidParams)
	require.Equal(t, "Retired", a.call("POST", "/v2/catalog/models/api-a/state", map[string]any{"state": "retired"}).body["lifecycle"])
	require.Equal(t, 200, a.call("POST", "/v2/catalog/models/api-up/verify", nil).status)
	list := a.call("GET", "/v2/catalog/models", nil)
	require.EqualValues(t, 2, list.body["count"], list.raw)
	require.Equal(t, 204, a.call("DELETE", "/v2/catalog/models/api-up", nil).status)
	requireError(t, a.call("DELETE", "/v2/catalog/models/api-up", nil), 404, apiserver.CodeModelNotFound)
	_, err = store.Stat(ctx, "models/api-up.gguf")
	require.ErrorIs(t, err, modelstore.ErrObjectMissing)

	// Staging and GC validation.
	requireError(t, a.call("POST", "/v2/nodes/ghost/models/api-a", nil), 404, apiserver.CodeNodeNotFound)
	requireError(t, a.call("POST", "/v2/nodes/ghost/gc", nil), 404, apiserver.CodeNodeNotFound)
	requireError(t, a.call("POST", "/v2/nodes/ghost/models/..%2Fx", nil), 400, apiserver.CodeInvalidParams)
}

// A GC whose node does not take it at once (here an HTTP agent's node,
// whose queue no worker polls) answers 202 with the run to follow after
// the call's wait, instead of holding the request until the GC's
// activities time out (FuzzAPI saw a GC call stall past 20 s).
func TestGCCallAnswersWhileTheRunGoesOn(t *testing.T) {
	a := startAPI(t)
	id := "ext-gc-1"
	r := a.call("POST", "/v2/nodes/register", map[string]any{"node_id": id, "machine_id": "machine-gc",
		"address": "10.0.0.6:9200", "heartbeat_interval_ms": 60000})
	require.Equal(t, 202, r.status, r.raw)
	a.waitState(id, node.Online, 30*time.Second)
	start := time.Now()
	r = a.call("POST", "/v2/nodes/"+id+"/gc", nil)
	took := time.Since(start)
	require.Equal(t, 202, r.status, r.raw)
	require.Equal(t, "running", r.body["state"])
	require.Equal(t, "gc:"+id, r.body["workflow_id"])
	require.Less(t, took, 30*time.Second, "answered after the call's wait, not the GC's timeouts")
	t.Logf("GC call answered 202 after %s", took.Round(time.Millisecond))
}
