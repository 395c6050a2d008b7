package fuzz

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// seed is one corpus entry: FuzzAPI's arguments.
type seed struct {
	name                          string
	route, params, query, headers string
	body                          string
}

// seeds are the corpus written into testdata/fuzz/FuzzAPI: one or more a
// route, and the defects issue 12 found, each as the input that showed it.
var seeds = []seed{
	{name: "health", route: "GET /health"},
	{name: "metrics", route: "GET /metrics", headers: "Authorization:"},
	{name: "nodes-list", route: "GET /v2/nodes", query: "state=online&state=draining"},
	{name: "nodes-register", route: "POST /v2/nodes/register", body: `{"node_id":"fz-rest","heartbeat_interval_ms":1000,"gpus":[{"index":0,"memory_total_bytes":10,"memory_free_bytes":5}]}`},
	{name: "nodes-get", route: "GET /v2/nodes/:id", params: "UPPER/../x"},
	{name: "nodes-delete", route: "DELETE /v2/nodes/:id", params: "fz-ghost", body: `{"reason":"gone"}`},
	{name: "nodes-heartbeat", route: "POST /v2/nodes/:id/heartbeat", params: "fz-ghost", body: `{"gpus":[{"index":0,"utilization_percent":101}]}`},
	{name: "nodes-drain", route: "POST /v2/nodes/:id/drain", params: "fz-ghost", body: `{"reason":"` + strings.Repeat("x", 600) + `"}`},
	{name: "nodes-undrain", route: "POST /v2/nodes/:id/undrain", params: "fz-ghost"},
	{name: "nodes-stage", route: "POST /v2/nodes/:id/models/:model_id", params: "\n..%2Fx"},
	{name: "nodes-models", route: "GET /v2/nodes/:id/models", query: "after=-1"},
	{name: "nodes-gc", route: "POST /v2/nodes/:id/gc", body: `{"dry_run":true}`},
	{name: "catalog-list", route: "GET /v2/catalog/models", query: "limit=99999999999999999999"},
	{name: "catalog-register", route: "POST /v2/catalog/models", body: `{"id":"fz-new","key":"models/../catalog/x.json"}`},
	{name: "catalog-upload", route: "POST /v2/catalog/models", query: "id=fz-up&key=models/fz-up.gguf", headers: "Content-Type: application/octet-stream", body: "GGUF\x03\x00\x00\x00 short"},
	{name: "catalog-get", route: "GET /v2/catalog/models/:id", params: "ünïcødé"},
	{name: "catalog-delete", route: "DELETE /v2/catalog/models/:id", params: "fz-ghost"},
	{name: "catalog-state", route: "POST /v2/catalog/models/:id/state", params: "fz-ghost", body: `{"state":"Sleeping"}`},
	{name: "catalog-verify", route: "POST /v2/catalog/models/:id/verify", params: strings.Repeat("a", 300)},
	{name: "catalog-availability", route: "GET /v2/catalog/availability", query: "model_id=fz-tiny&model_id=x"},
	{name: "pools-create", route: "POST /v2/pools", body: `{"pool_id":"fz-p2","model_id":"fz-ghost","node_id":"fz-ghost","slots":2}`},
	{name: "pools-list", route: "GET /v2/pools"},
	{name: "pools-health", route: "GET /v2/pools/:id/health"},
	{name: "pools-drain", route: "POST /v2/pools/:id/drain", params: "fz-ghost", body: `{"deadline_ms":100}`},
	{name: "pools-reload", route: "POST /v2/pools/:id/reload", params: "fz-ghost", body: `{}`},
	{name: "keys-create", route: "POST /v2/keys", body: `{"name":"fz-new","scopes":["inference"],"expires_at":"2999-01-01T00:00:00Z","limits":{"tokens_per_minute":9223372036854775807}}`},
	{name: "keys-create-node", route: "POST /v2/keys", body: `{"name":"fz-n","scopes":["node","admin"],"node_id":"../x"}`},
	{name: "keys-list", route: "GET /v2/keys", headers: "Authorization: Bearer $KEY"},
	{name: "keys-get", route: "GET /v2/keys/:id"},
	{name: "keys-get-bad-id", route: "GET /v2/keys/:id", params: "llk_x_y"},
	{name: "keys-revoke", route: "DELETE /v2/keys/:id", params: "k0123456789abcdef"},
	{name: "keys-usage", route: "GET /v2/keys/:id/usage", headers: "Authorization: Bearer $KEY"},
	{name: "keys-usage-other", route: "GET /v2/keys/:id/usage", params: "bootstrap", headers: "Authorization: Bearer $KEY"},
	{name: "key-task", route: "POST /v2/tasks", headers: "Authorization: Bearer $KEY", body: `{"model_ref":"fz-tiny","prompt":"Once","max_tokens":2}`},
	{name: "key-v1-completions", route: "POST /v1/completions", headers: "Authorization: Bearer $KEY", body: `{"model":"fz-tiny","prompt":"once","max_tokens":2}`},
	{name: "key-admin-route", route: "POST /v2/pools/:id/drain", params: "fz-ghost", headers: "Authorization: Bearer $KEY", body: `{}`},
	{name: "tasks-create", route: "POST /v2/tasks", body: `{"model_ref":"fz-tiny","prompt":"Once upon","max_tokens":8,"priority":"batch"}`},
	{name: "tasks-get", route: "GET /v2/tasks/:id"},
	{name: "tasks-list", route: "GET /v2/tasks", query: "state=completed&model=fz-tiny&page_size=2&page_token=AAAA"},
	{name: "tasks-events", route: "GET /v2/tasks/:id/events", headers: "Last-Event-ID: 2"},
	{name: "tasks-cancel", route: "POST /v2/tasks/:id/cancel", params: "fz-ghost"},
	{name: "sessions-get", route: "GET /v2/sessions/:id"},
	{name: "sessions-delete", route: "DELETE /v2/sessions/:id", params: "fz-ghost"},
	{name: "v1-chat", route: "POST /v1/chat/completions", body: `{"model":"fz-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`},
	{name: "v1-chat-stream", route: "POST /v1/chat/completions", body: `{"model":"fz-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}`},
	{name: "v1-completions", route: "POST /v1/completions", body: `{"model":"fz-tiny","prompt":"once","max_tokens":4,"seed":7}`},
	{name: "v1-models", route: "GET /v1/models", headers: "Authorization: Bearer nope"},
	{name: "v1-model", route: "GET /v1/models/:id", params: "fz-tiny"},
	{name: "head-v1-model", route: "HEAD /v1/models/:id", params: "fz-ghost"},
	{name: "v1-responses", route: "POST /v1/responses", body: `{"model":"fz-tiny","input":"hi","max_output_tokens":4,"store":false}`},
	{name: "v1-responses-stream", route: "POST /v1/responses", body: `{"model":"fz-tiny","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"max_output_tokens":4,"stream":true,"text":{"format":{"type":"json_object"}}}`},
	{name: "v1-chat-json-logprobs", route: "POST /v1/chat/completions", body: `{"model":"fz-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":6,"logprobs":true,"top_logprobs":2,"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"type":"boolean"}},"required":["a"]}}}}`},
	{name: "push", route: "POST /internal/v1/streams/:id", params: "fz-push", body: `{"events":[{"seq":1,"type":"token","text":"x"}]}`},
	{name: "head-nodes", route: "HEAD /v2/nodes"},
	{name: "bad-correlation-id", route: "GET /v2/nodes", headers: "X-Correlation-Id: bad id\twith spaces"},
	{name: "raw-no-route", route: "RAW GET /v2/nope/../../etc/passwd"},
	{name: "raw-method", route: "RAW BREW /v2/tasks"},

	// The defects of issue 12, each as the input that showed it.
	{name: "defect-last-event-id-max", route: "GET /v2/tasks/:id/events", headers: "Last-Event-ID: 9223372036854775807"},
	{name: "defect-last-event-id-huge", route: "GET /v2/tasks/:id/events", headers: "Last-Event-ID: 99999999999999999999"},
	{name: "defect-chunked-v1-over-limit", route: "POST /v1/chat/completions", headers: "Transfer-Encoding: chunked\nX-Fuzz-Repeat: 40000", body: strings.Repeat("x", 64)},
	{name: "defect-chunked-tasks-over-limit", route: "POST /v2/tasks", headers: "Transfer-Encoding: chunked\nX-Fuzz-Repeat: 40000", body: strings.Repeat("x", 64)},
	{name: "defect-chunked-push-over-limit", route: "POST /internal/v1/streams/:id", params: "fz-push", headers: "Transfer-Encoding: chunked\nX-Fuzz-Repeat: 40000", body: strings.Repeat("x", 64)},
	{name: "defect-multipart-before-auth", route: "POST /v2/catalog/models", headers: "Authorization:\nContent-Type: multipart/form-data; boundary=B\nContent-Length: 33554432",
		body: "--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"m.gguf\"\r\n\r\nxxxx"},
	{name: "defect-retried-task-id", route: "POST /v2/tasks", body: `{"task_id":"fz-task","model_ref":"fz-tiny","prompt":"Once","max_tokens":4}`},
	{name: "defect-drain-deadline-huge", route: "POST /v2/pools/:id/drain", params: "p-hostile", body: `{"deadline_ms":9223372036854775807}`},
	{name: "defect-device-mask", route: "POST /v2/pools", body: `{"pool_id":"p-hostile","model_id":"m","device_mask":"0,0"}`},
	{name: "defect-device-mask-huge", route: "POST /v2/pools", body: `{"pool_id":"p-hostile","model_id":"m","device_mask":"9223372036854775808"}`},
}

var seedName = regexp.MustCompile(`^[a-z0-9-]+$`)

// TestWriteSeeds rewrites the seed entries of the corpus from seeds
// (LLORCH_FUZZ_WRITE_SEEDS=1); entries the engine found stay.
func TestWriteSeeds(t *testing.T) {
	if os.Getenv("LLORCH_FUZZ_WRITE_SEEDS") == "" {
		t.Skip("LLORCH_FUZZ_WRITE_SEEDS=1 rewrites testdata/fuzz/FuzzAPI/seed-*")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzAPI")
	old, _ := filepath.Glob(filepath.Join(dir, "seed-*"))
	for _, p := range old {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range seeds {
		if !seedName.MatchString(s.name) {
			t.Fatalf("seed name %q", s.name)
		}
		text := fmt.Sprintf("go test fuzz v1\nstring(%s)\nstring(%s)\nstring(%s)\nstring(%s)\n[]byte(%s)\n",
			strconv.Quote(s.route), strconv.Quote(s.params), strconv.Quote(s.query), strconv.Quote(s.headers), strconv.Quote(s.body))
		if err := os.WriteFile(filepath.Join(dir, "seed-"+s.name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
