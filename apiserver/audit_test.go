package apiserver_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
)

// syncBuffer is the audit logger's sink: handlers write from their own
// goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// events are the audit events written so far, parsed.
func (s *syncBuffer) events(t *testing.T) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(s.b.Bytes()))
	for sc.Scan() {
		var e map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &e), sc.Text())
		out = append(out, e)
	}
	return out
}

// startAuditAPI runs an apiserver with every route (catalog, nodes, pools,
// tasks, sessions) and a control worker running every workflow, its audit
// trail captured. Its scheduler sees one Ready pool of modelID on nodeID
// that no worker serves: a task is admitted, and waits for its node.
func startAuditAPI(t *testing.T, nodeID, poolID, modelID string) (*api, *syncBuffer, *prometheus.Registry) {
	t.Helper()
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), nil))
	audit := &syncBuffer{}
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	reg := prometheus.NewRegistry()
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Via: "rest", Metrics: control.NewNodeMetrics(reg)}
	tasks := &control.Tasks{Temporal: env.Temporal}
	sessions := &control.Sessions{Temporal: env.Temporal}
	hub := &tokenstream.Hub{}
	sched := &scheduler.Scheduler{Tasks: tasks, Sessions: sessions, Log: log, Metrics: scheduler.NewMetrics(reg),
		Source: func(context.Context) ([]placement.Candidate, error) {
			return []placement.Candidate{{PoolID: poolID, NodeID: nodeID, ModelID: modelID, URL: "http://127.0.0.1:1",
				Epoch: 1, State: pool.Ready, NodeOnline: true, SlotsTotal: 4}}, nil
		}}
	w := workers.NewControl(env.Temporal, &activities.CatalogActivities{Store: store},
		&scheduler.TaskControl{S: sched, Hub: hub, Metrics: sched.Metrics})
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
	s, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0", Token: token}, apiserver.Deps{
		Nodes: nodes, Store: store, Registry: reg, Logger: log, Tasks: tasks, Scheduler: sched, Hub: hub, Sessions: sessions,
		Pools:  &control.Pools{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()},
		Models: &control.Models{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Nodes: nodes},
		Audit:  slog.New(slog.NewJSONHandler(audit, nil)),
	})
	require.NoError(t, err)
	require.NoError(t, s.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return &api{t: t, base: "http://" + s.Addr(), logs: logs}, audit, reg
}

// memo reads a workflow's memo field into v; false while it has none.
func memo(t *testing.T, workflowID, field string, v any) bool {
	t.Helper()
	d, err := env.Temporal.DescribeWorkflowExecution(context.Background(), workflowID, "")
	require.NoError(t, err)
	p, ok := d.GetWorkflowExecutionInfo().GetMemo().GetFields()[field]
	if !ok {
		return false
	}
	// Memos are encrypted as every payload (the codec of env.Temporal).
	require.NoError(t, codec.DataConverter(env.Codec).FromPayload(p, v))
	return true
}

// requireActorMemo waits until workflowID's memo names the bootstrap key
// calling from loopback, with change as its last change ("" for a start,
// which names no change).
func requireActorMemo(t *testing.T, workflowID, change string) {
	t.Helper()
	want := apikey.Actor{KeyID: apikey.BootstrapID, KeyName: "bootstrap", Addr: "127.0.0.1"}
	testenv.Eventually(t, 20*time.Second, workflowID+" memo names the actor of "+change, func() (bool, string) {
		var a apikey.Actor
		var last string
		if !memo(t, workflowID, apikey.MemoActor, &a) {
			return false, "no actor in the memo"
		}
		memo(t, workflowID, apikey.MemoLastChange, &last)
		return a == want && last == change, a.String() + " " + a.Addr + " last_change " + last
	})
}

// Every state-changing route records one audit event naming who, what,
// which target, the outcome and the correlation id, refused calls
// included; the workflows the calls start or change name the actor in
// their memo.
func TestAuditTrail(t *testing.T) {
	run := strconv.FormatInt(time.Now().UnixNano()%1e9, 36) // ids of this run: re-runs stay apart
	nodeID, poolID, modelID, taskID := "audit-n-"+run, "audit-p-"+run, "audit-m-"+run, "audit-t-"+run
	a, audit, reg := startAuditAPI(t, nodeID, poolID, modelID)

	ctx := context.Background()
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "m.gguf")
	require.NoError(t, modelstore.WriteTinyFile(path, modelstore.TinyOptions{Seed: 7}))
	f, err := os.Open(path)
	require.NoError(t, err)
	_, err = store.Upload(ctx, f, -1, "models/"+modelID+".gguf", nil)
	f.Close()
	require.NoError(t, err)

	const secret = "the secret prompt"
	bootstrap := "Bearer " + token
	for _, c := range []struct {
		name, method, path, auth string
		body                     any
		route                    string
		target                   map[string]any
		status                   int
		code                     string
		after                    func(t *testing.T)
	}{
		{name: "register model", method: "POST", path: "/v2/catalog/models", body: map[string]any{"id": modelID, "key": "models/" + modelID + ".gguf"},
			route: "/v2/catalog/models", target: map[string]any{"model_id": modelID}, status: 201},
		{name: "register node", method: "POST", path: "/v2/nodes/register",
			body:  map[string]any{"node_id": nodeID, "heartbeat_interval_ms": 60000, "gpus": []any{map[string]any{"index": 0, "name": "L4", "memory_total_bytes": 100, "memory_free_bytes": 50}}},
			route: "/v2/nodes/register", target: map[string]any{"node_id": nodeID}, status: 202,
			after: func(t *testing.T) { requireActorMemo(t, node.WorkflowID(nodeID), "register") }},
		{name: "heartbeat", method: "POST", path: "/v2/nodes/" + nodeID + "/heartbeat", body: map[string]any{},
			route: "/v2/nodes/:id/heartbeat", target: map[string]any{"node_id": nodeID}, status: 200},
		{name: "drain node", method: "POST", path: "/v2/nodes/" + nodeID + "/drain", body: map[string]any{"reason": "audit test"},
			route: "/v2/nodes/:id/drain", target: map[string]any{"node_id": nodeID}, status: 200,
			after: func(t *testing.T) { requireActorMemo(t, node.WorkflowID(nodeID), "drain") }},
		{name: "drain refused without a token", method: "POST", path: "/v2/nodes/" + nodeID + "/drain",
			route: "/v2/nodes/:id/drain", target: map[string]any{"node_id": nodeID}, status: 401, code: apiserver.CodeMissingToken},
		{name: "drain refused with a bad token", method: "POST", path: "/v2/nodes/" + nodeID + "/drain", auth: "Bearer not-the-token",
			route: "/v2/nodes/:id/drain", target: map[string]any{"node_id": nodeID}, status: 401, code: apiserver.CodeBadToken},
		{name: "undrain node", method: "POST", path: "/v2/nodes/" + nodeID + "/undrain",
			route: "/v2/nodes/:id/undrain", target: map[string]any{"node_id": nodeID}, status: 200,
			after: func(t *testing.T) { requireActorMemo(t, node.WorkflowID(nodeID), "undrain") }},
		{name: "model state", method: "POST", path: "/v2/catalog/models/" + modelID + "/state", body: map[string]any{"state": "Active"},
			route: "/v2/catalog/models/:id/state", target: map[string]any{"model_id": modelID}, status: 200},
		{name: "verify model", method: "POST", path: "/v2/catalog/models/" + modelID + "/verify",
			route: "/v2/catalog/models/:id/verify", target: map[string]any{"model_id": modelID}, status: 200},
		{name: "drain a pool that is not", method: "POST", path: "/v2/pools/no-" + poolID + "/drain", body: map[string]any{},
			route: "/v2/pools/:id/drain", target: map[string]any{"pool_id": "no-" + poolID}, status: 404, code: "POOL_NOT_FOUND"},
		{name: "reload a pool that is not", method: "POST", path: "/v2/pools/no-" + poolID + "/reload", body: map[string]any{"model_id": modelID},
			route: "/v2/pools/:id/reload", target: map[string]any{"pool_id": "no-" + poolID}, status: 404, code: "POOL_NOT_FOUND"},
		{name: "gc of a node that is not", method: "POST", path: "/v2/nodes/no-" + nodeID + "/gc",
			route: "/v2/nodes/:id/gc", target: map[string]any{"node_id": "no-" + nodeID}, status: 404, code: apiserver.CodeNodeNotFound},
		{name: "create task", method: "POST", path: "/v2/tasks", body: map[string]any{"task_id": taskID, "model": modelID, "prompt": secret, "max_tokens": 4},
			route: "/v2/tasks", target: map[string]any{"task_id": taskID}, status: 202,
			after: func(t *testing.T) { requireActorMemo(t, task.WorkflowID(taskID), "") }},
		{name: "cancel task", method: "POST", path: "/v2/tasks/" + taskID + "/cancel",
			route: "/v2/tasks/:id/cancel", target: map[string]any{"task_id": taskID}, status: 204,
			after: func(t *testing.T) { requireActorMemo(t, task.WorkflowID(taskID), "cancel") }},
		{name: "end a session that is not", method: "DELETE", path: "/v2/sessions/no-session-" + run,
			route: "/v2/sessions/:id", target: map[string]any{"session_id": "no-session-" + run}, status: 404, code: "SESSION_NOT_FOUND"},
		{name: "completion refused", method: "POST", path: "/v1/completions", body: map[string]any{"model": modelID, "prompt": secret, "max_tokens": -1},
			route: "/v1/completions", status: 400},
		{name: "unknown route", method: "POST", path: "/v2/no-such-route", route: "unmatched", status: 404, code: apiserver.CodeNotFound},
		{name: "deregister node", method: "DELETE", path: "/v2/nodes/" + nodeID,
			route: "/v2/nodes/:id", target: map[string]any{"node_id": nodeID}, status: 200,
			after: func(t *testing.T) { requireActorMemo(t, node.WorkflowID(nodeID), "deregister") }},
		{name: "delete model", method: "DELETE", path: "/v2/catalog/models/" + modelID,
			route: "/v2/catalog/models/:id", target: map[string]any{"model_id": modelID}, status: 204},
	} {
		t.Run(c.name, func(t *testing.T) {
			auth := c.auth
			if auth == "" && c.status != 401 {
				auth = bootstrap
			}
			before := len(audit.events(t))
			r := a.do(c.method, c.path, auth, c.body)
			require.Equal(t, c.status, r.status, r.raw)
			evs := audit.events(t)[before:]
			require.Len(t, evs, 1, "one audit event per call")
			e := evs[0]
			require.Equal(t, "audit", e["stream"])
			require.Equal(t, "audit", e["msg"])
			require.NotEmpty(t, e["time"])
			require.Equal(t, r.header.Get("X-Correlation-Id"), e["correlation_id"])
			require.Equal(t, c.method, e["method"])
			require.Equal(t, c.route, e["route"])
			require.Equal(t, float64(c.status), e["status"])
			require.Equal(t, strconv.Itoa(c.status/100)+"xx", e["outcome"])
			require.Equal(t, "127.0.0.1", e["addr"])
			if c.status == 401 {
				require.Empty(t, e["key_id"], "a refused call names no key")
			} else {
				require.Equal(t, apikey.BootstrapID, e["key_id"])
				require.Equal(t, "bootstrap", e["key_name"])
			}
			if c.code != "" {
				require.Equal(t, c.code, e["code"])
			}
			if c.target != nil {
				require.Equal(t, c.target, e["target"])
			}
			raw, _ := json.Marshal(e)
			require.NotContains(t, string(raw), secret, "no body in the trail")
			require.NotContains(t, string(raw), token, "no token in the trail")
			if c.after != nil {
				c.after(t)
			}
		})
	}
	// A GET is no audit event.
	before := len(audit.events(t))
	require.Equal(t, 200, a.call("GET", "/v2/nodes", nil).status)
	require.Len(t, audit.events(t), before)

	m := a.do("GET", "/metrics", "", nil).raw
	require.Contains(t, m, `llorch_audit_events_total{action="POST /v2/nodes/:id/drain",outcome="4xx"} 2`)
	require.Contains(t, m, `llorch_audit_events_total{action="POST /v2/nodes/:id/drain",outcome="2xx"} 1`)
	_ = reg

	// The canceled task and the deregistered node end; their histories,
	// with the actor memo upserted, are recorded for the replay tests.
	for _, wid := range []string{task.WorkflowID(taskID), node.WorkflowID(nodeID)} {
		testenv.Eventually(t, 30*time.Second, wid+" closed", func() (bool, string) {
			d, err := env.Temporal.DescribeWorkflowExecution(ctx, wid, "")
			require.NoError(t, err)
			s := d.GetWorkflowExecutionInfo().GetStatus()
			return s != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, s.String()
		})
	}
	recordAuditHistory(t, task.WorkflowID(taskID), "task-canceled-actor-memo")
	recordAuditHistory(t, node.WorkflowID(nodeID), "node-http-drained-actor-memo")
}

// recordAuditHistory saves a workflow's history for the replay tests when
// LLORCH_RECORD_HISTORIES=1; it must hold the memo's upsert.
func recordAuditHistory(t *testing.T, workflowID, name string) {
	h := env.RecordHistory(t, workflowID, "", name)
	if h == nil {
		return
	}
	upserted := false
	for _, e := range h.Events {
		upserted = upserted || e.GetEventType() == enumspb.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED
	}
	require.True(t, upserted, "the history of %s holds the memo's upsert", workflowID)
}
