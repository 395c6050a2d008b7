package apiserver_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/controlplane"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/testenv"
)

// startKeyAPI runs an apiserver as `llorch apiserver` builds it
// (controlplane: every route, the key registry and a key cache polling
// it, quotas, the control worker), against the package's Temporal.
// Several share the registry.
func startKeyAPI(t *testing.T) *api {
	t.Helper()
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), nil))
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	p, err := controlplane.New(controlplane.Config{
		Temporal: env.Temporal, DataConverter: codec.DataConverter(env.Codec), Namespace: env.Namespace, Identity: "apiserver-test",
		Store: store, API: apiserver.Config{Addr: "127.0.0.1:0", Token: token},
		Logger: log, Registry: prometheus.NewRegistry(), Audit: io.Discard,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = p.Stop(ctx)
	})
	return &api{t: t, base: "http://" + p.API.Addr(), logs: logs, routes: p.API.App().GetRoutes(true)}
}

// newKey creates a key with the bootstrap token; its id and secret.
func (a *api) newKey(body map[string]any) (string, string) {
	a.t.Helper()
	r := a.call("POST", "/v2/keys", body)
	require.Equal(a.t, 201, r.status, r.raw)
	return r.body["key_id"].(string), r.body["secret"].(string)
}

// waitAuth waits until a token's answer on a is (or is not) a 401.
func (a *api) waitAuth(secret string, accepted bool, timeout time.Duration) time.Duration {
	a.t.Helper()
	start := time.Now()
	testenv.Eventually(a.t, timeout, fmt.Sprintf("token accepted=%v", accepted), func() (bool, string) {
		r := a.do("GET", "/v2/keys", "Bearer "+secret, nil)
		return (r.status != 401) == accepted, r.raw
	})
	return time.Since(start)
}

func TestKeysCreateListRevoke(t *testing.T) {
	a := startKeyAPI(t)
	r := a.call("POST", "/v2/keys", map[string]any{"name": "ci", "scopes": []string{"inference"},
		"expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339), "limits": map[string]any{"concurrent_tasks": 2}})
	require.Equal(t, 201, r.status, r.raw)
	id, secret := r.body["key_id"].(string), r.body["secret"].(string)
	require.True(t, strings.HasPrefix(secret, "llk_"+id+"_"), secret)
	require.Equal(t, "live", r.body["state"])
	require.Equal(t, "bootstrap", r.body["created_by"].(map[string]any)["key_name"])

	list := a.call("GET", "/v2/keys", nil)
	require.Equal(t, 200, list.status, list.raw)
	require.Contains(t, list.raw, id)
	require.NotContains(t, list.raw, secret, "the secret is shown once")
	require.NotContains(t, list.raw, "hash")
	got := a.call("GET", "/v2/keys/"+id, nil)
	require.Equal(t, 200, got.status, got.raw)
	require.NotContains(t, got.raw, secret)
	require.EqualValues(t, 2, got.body["limits"].(map[string]any)["concurrent_tasks"])

	for name, c := range map[string]struct {
		body  any
		field string
	}{
		"unknown field": {map[string]any{"name": "x", "scopes": []string{"admin"}, "scope": "x"}, "scope"},
		"unknown scope": {map[string]any{"name": "x", "scopes": []string{"root"}}, "scopes"},
		"no name":       {map[string]any{"scopes": []string{"admin"}}, "name"},
		"long name":     {map[string]any{"name": strings.Repeat("n", 65), "scopes": []string{"admin"}}, "name"},
		"node no id":    {map[string]any{"name": "x", "scopes": []string{"node"}}, "node_id"},
		"past":          {map[string]any{"name": "x", "scopes": []string{"admin"}, "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"},
		"bad time":      {map[string]any{"name": "x", "scopes": []string{"admin"}, "expires_at": "tomorrow"}, "expires_at"},
		"negative":      {map[string]any{"name": "x", "scopes": []string{"admin"}, "limits": map[string]any{"tokens_per_minute": -1}}, "limits"},
	} {
		r := a.call("POST", "/v2/keys", c.body)
		requireError(t, r, 400, apiserver.CodeInvalidParams)
		require.Equal(t, c.field, r.body["field"], "%s: %s", name, r.raw)
	}

	a.waitAuth(secret, true, 10*time.Second)
	requireError(t, a.do("GET", "/v2/keys", "Bearer "+secret, nil), 403, apiserver.CodeForbidden)
	del := a.call("DELETE", "/v2/keys/"+id, nil)
	require.Equal(t, 200, del.status, del.raw)
	require.Equal(t, "revoked", del.body["state"])
	again := a.call("DELETE", "/v2/keys/"+id, nil)
	require.Equal(t, 200, again.status, "revoking again is the same answer: %s", again.raw)
	require.Equal(t, del.body["revoked_at"], again.body["revoked_at"])
	requireError(t, a.call("DELETE", "/v2/keys/k0123456789abcdef", nil), 404, apiserver.CodeKeyNotFound)
	requireError(t, a.call("GET", "/v2/keys/k0123456789abcdef", nil), 404, apiserver.CodeKeyNotFound)
	requireError(t, a.call("GET", "/v2/keys/nope", nil), 400, apiserver.CodeInvalidParams)
	a.waitAuth(secret, false, 5*time.Second)
	requireError(t, a.do("GET", "/v2/tasks/t1", "Bearer "+secret, nil), 401, apiserver.CodeBadToken)
	m := a.do("GET", "/metrics", "", nil)
	require.Contains(t, m.raw, `llorch_api_key_lookup_refusals_total{reason="revoked"}`)
	require.Contains(t, m.raw, `llorch_api_keys{state="revoked"}`)
	require.Contains(t, m.raw, "llorch_api_keys_cache_age_seconds")
}

// Every route against every kind of caller: 401 without a live key, 403
// FORBIDDEN naming the scope with the wrong one, and anything else (the
// handler's own answer) with the right one.
func TestScopesOnEveryRoute(t *testing.T) {
	a := startKeyAPI(t)
	_, adminKey := a.newKey(map[string]any{"name": "ops", "scopes": []string{"admin"}})
	_, infKey := a.newKey(map[string]any{"name": "app", "scopes": []string{"inference"}})
	_, n1Key := a.newKey(map[string]any{"name": "node n1", "scopes": []string{"node"}, "node_id": "n1"})
	_, n2Key := a.newKey(map[string]any{"name": "node n2", "scopes": []string{"node"}, "node_id": "n2"})
	revID, revKey := a.newKey(map[string]any{"name": "old", "scopes": []string{"admin"}})
	for _, k := range []string{adminKey, infKey, n1Key, n2Key} {
		a.waitAuth(k, true, 10*time.Second)
	}
	require.Equal(t, 200, a.call("DELETE", "/v2/keys/"+revID, nil).status)
	a.waitAuth(revKey, false, 5*time.Second)

	callers := []struct{ name, auth string }{
		{"bootstrap", "Bearer " + token}, {"admin", "Bearer " + adminKey}, {"inference", "Bearer " + infKey},
		{"node-n1", "Bearer " + n1Key}, {"node-n2", "Bearer " + n2Key}, {"none", ""}, {"revoked", "Bearer " + revKey},
	}
	const (
		A = "admin"     // admin only
		I = "inference" // admin and inference
		N = "node"      // admin and the key of node n1
	)
	heartbeat := map[string]any{"gpus": []any{}}
	register := map[string]any{"node_id": "n1", "heartbeat_interval_ms": 1000}
	routes := []struct {
		method, path string
		body         any
		scope        string
	}{
		{"GET", "/v2/nodes", nil, A},
		{"POST", "/v2/nodes/register", register, N},
		{"GET", "/v2/nodes/n1", nil, A},
		{"DELETE", "/v2/nodes/ghost", nil, A},
		{"POST", "/v2/nodes/n1/heartbeat", heartbeat, N},
		{"POST", "/v2/nodes/ghost/drain", map[string]any{}, A},
		{"POST", "/v2/nodes/ghost/undrain", nil, A},
		{"POST", "/v2/nodes/ghost/models/m1", nil, A},
		{"GET", "/v2/nodes/ghost/models", nil, A},
		{"POST", "/v2/nodes/ghost/gc", nil, A},
		{"GET", "/v2/catalog/models", nil, A},
		{"POST", "/v2/catalog/models", map[string]any{}, A},
		{"GET", "/v2/catalog/models/ghost", nil, A},
		{"DELETE", "/v2/catalog/models/ghost", nil, A},
		{"POST", "/v2/catalog/models/ghost/state", map[string]any{"state": "deprecated"}, A},
		{"POST", "/v2/catalog/models/ghost/verify", nil, A},
		{"GET", "/v2/catalog/availability", nil, A},
		{"POST", "/v2/pools", map[string]any{}, A},
		{"GET", "/v2/pools", nil, A},
		{"GET", "/v2/pools/ghost/health", nil, A},
		{"POST", "/v2/pools/ghost/drain", nil, A},
		{"POST", "/v2/pools/ghost/reload", nil, A},
		{"POST", "/v2/keys", map[string]any{}, A},
		{"GET", "/v2/keys", nil, A},
		{"GET", "/v2/keys/k0123456789abcdef", nil, A},
		{"DELETE", "/v2/keys/k0123456789abcdef", nil, A},
		{"GET", "/v2/keys/k0123456789abcdef/usage", nil, A}, // a key's own: its own key id (TestQuota*)
		{"POST", "/v2/tasks", map[string]any{}, I},
		{"GET", "/v2/tasks", nil, I},
		{"GET", "/v2/tasks/ghost", nil, I},
		{"GET", "/v2/tasks/ghost/events", nil, I},
		{"POST", "/v2/tasks/ghost/cancel", nil, I},
		{"GET", "/v2/sessions/ghost", nil, I},
		{"DELETE", "/v2/sessions/ghost", nil, I},
		{"POST", "/v1/chat/completions", map[string]any{}, I},
		{"POST", "/v1/completions", map[string]any{}, I},
		{"POST", "/v1/responses", map[string]any{}, I},
		{"GET", "/v1/models", nil, I},
		{"GET", "/v1/models/ghost", nil, I},
	}
	// The table covers every route the server has: a new route without a
	// row fails here, not in production.
	param := regexp.MustCompile(`:[a-z_]+`)
	rowOf := map[string]bool{}
	for _, rt := range routes {
		rowOf[rt.method+" "+rt.path] = true
	}
	for _, r := range a.routes {
		if r.Method == "HEAD" || !strings.HasPrefix(r.Path, "/v") {
			continue
		}
		pattern := regexp.MustCompile("^" + param.ReplaceAllString(regexp.QuoteMeta(r.Path), "[^/]+") + "$")
		found := false
		for row := range rowOf {
			m, p, _ := strings.Cut(row, " ")
			found = found || m == r.Method && pattern.MatchString(p)
		}
		require.True(t, found, "route %s %s has no row in the scope table", r.Method, r.Path)
	}
	allowed := func(scope, caller string) bool {
		switch caller {
		case "bootstrap", "admin":
			return true
		case "inference":
			return scope == I
		case "node-n1":
			return scope == N
		}
		return false
	}
	var table strings.Builder
	for _, rt := range routes {
		fmt.Fprintf(&table, "%-7s %-34s", rt.method, rt.path)
		for _, c := range callers {
			r := a.do(rt.method, rt.path, c.auth, rt.body)
			fmt.Fprintf(&table, " %s=%d", c.name, r.status)
			where := fmt.Sprintf("%s %s as %s: %s", rt.method, rt.path, c.name, r.raw)
			v1 := strings.HasPrefix(rt.path, "/v1/")
			switch {
			case c.name == "none" || c.name == "revoked":
				require.Equal(t, 401, r.status, where)
			case allowed(rt.scope, c.name):
				require.NotContains(t, []int{401, 403}, r.status, where)
			default:
				require.Equal(t, 403, r.status, where)
				msg := r.raw
				if v1 {
					e := r.body["error"].(map[string]any)
					require.Equal(t, "forbidden", e["code"], where)
				} else {
					require.Equal(t, apiserver.CodeForbidden, r.body["code"], where)
				}
				want := rt.scope
				if c.name == "node-n2" && rt.scope == N {
					want = "node n1" // acts for n1 only
				}
				require.Contains(t, msg, "scope "+strings.TrimSuffix(want, " n1"), where)
				if want == "node n1" {
					require.Contains(t, msg, "node n2 only", where)
				}
			}
		}
		table.WriteString("\n")
	}
	t.Logf("route x caller:\n%s", table.String())
}

// A key revoked on one replica is refused by another within 1 s (each
// polls the registry every 250 ms).
func TestRevocationOnAnotherReplica(t *testing.T) {
	a, b := startKeyAPI(t), startKeyAPI(t)
	id, secret := a.newKey(map[string]any{"name": "rotating", "scopes": []string{"admin"}})
	took := b.waitAuth(secret, true, 10*time.Second)
	t.Logf("a key created on replica A authenticates on replica B after %s", took.Round(time.Millisecond))
	start := time.Now()
	require.Equal(t, 200, a.call("DELETE", "/v2/keys/"+id, nil).status)
	revokeCall := time.Since(start)
	var refused time.Duration
	testenv.Eventually(t, 5*time.Second, "revoked key refused on B", func() (bool, string) {
		r := b.do("GET", "/v2/nodes", "Bearer "+secret, nil)
		refused = time.Since(start)
		return r.status == 401, r.raw
	})
	t.Logf("revocation on replica A (the call took %s) refused on replica B %s after the DELETE was sent",
		revokeCall.Round(time.Millisecond), refused.Round(time.Millisecond))
	require.Less(t, refused, time.Second, "revocation effective on every replica within 1 s")
}

// A key sees only its own sessions: another's is SESSION_NOT_FOUND (the
// same as one that does not exist); an admin sees every one.
func TestKeysSeeTheirOwnOnly(t *testing.T) {
	a := startKeyAPI(t)
	_, k1 := a.newKey(map[string]any{"name": "app1", "scopes": []string{"inference"}})
	_, k2 := a.newKey(map[string]any{"name": "app2", "scopes": []string{"inference"}})
	a.waitAuth(k1, true, 10*time.Second)
	a.waitAuth(k2, true, 10*time.Second)
	sessions := &control.Sessions{Temporal: env.Temporal}
	id1 := strings.Split(k1, "_")[1]
	_, err := sessions.Turn(context.Background(), "s-own-1", sessionTurn("t-own-1", id1))
	require.NoError(t, err)
	require.Equal(t, 200, a.do("GET", "/v2/sessions/s-own-1", "Bearer "+k1, nil).status)
	requireError(t, a.do("GET", "/v2/sessions/s-own-1", "Bearer "+k2, nil), 404, apiserver.CodeSessionNotFound)
	requireError(t, a.do("DELETE", "/v2/sessions/s-own-1", "Bearer "+k2, nil), 404, apiserver.CodeSessionNotFound)
	requireError(t, a.do("GET", "/v2/sessions/s-none", "Bearer "+k2, nil), 404, apiserver.CodeSessionNotFound)
	// Another key's turn is refused: it would join a session it cannot see.
	_, err = sessions.Turn(context.Background(), "s-own-1", sessionTurn("t-own-2", strings.Split(k2, "_")[1]))
	require.ErrorIs(t, err, control.ErrSessionNotFound)
	require.Equal(t, 200, a.call("GET", "/v2/sessions/s-own-1", nil).status, "admin sees every session")
	require.Equal(t, 204, a.do("DELETE", "/v2/sessions/s-own-1", "Bearer "+k1, nil).status)
}

func sessionTurn(taskID, owner string) session.TurnRequest {
	return session.TurnRequest{TaskID: taskID, ModelID: "m", Owner: owner}
}
