package apiserver_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/tokenstream"
)

// startTaskAPI runs an apiserver with its task routes (a scheduler and a
// hub; no pools, so nothing is admitted) against the package's Temporal.
func startTaskAPI(t *testing.T) (*api, *tokenstream.Hub) {
	t.Helper()
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), nil))
	reg := prometheus.NewRegistry()
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Via: "rest", Metrics: control.NewNodeMetrics(reg)}
	tasks := &control.Tasks{Temporal: env.Temporal}
	hub := &tokenstream.Hub{}
	sched := &scheduler.Scheduler{Tasks: tasks, Log: log, Metrics: scheduler.NewMetrics(reg),
		Source: func(context.Context) ([]placement.Candidate, error) { return nil, nil }}
	s, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0", Token: token}, apiserver.Deps{
		Nodes: nodes, Registry: reg, Logger: log, Tasks: tasks, Scheduler: sched, Hub: hub,
		Models: &control.Models{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter(), Nodes: nodes},
	})
	require.NoError(t, err)
	require.NoError(t, s.Listen("127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return &api{t: t, base: "http://" + s.Addr(), logs: logs}, hub
}

// rawSend writes head, then (chunked) size bytes of body and never ends
// it, and returns the answer the server gives while the body is still
// open: a server that reads the whole body before answering never does.
func rawSend(t *testing.T, base, head string, body func(w io.Writer)) *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	_, err = io.WriteString(conn, head)
	require.NoError(t, err)
	go body(conn) // fails once the server closes: ignored
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(20*time.Second)))
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "the server must answer before the body ends")
	return res
}

// chunks writes n bytes as 64 KiB chunks, without the final chunk.
func chunks(n int) func(io.Writer) {
	return func(w io.Writer) {
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		for sent := 0; sent < n; sent += len(chunk) {
			if _, err := fmt.Fprintf(w, "%x\r\n%s\r\n", len(chunk), chunk); err != nil {
				return
			}
		}
	}
}

func chunkedHead(method, path, auth, contentType string) string {
	h := method + " " + path + " HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: " + contentType + "\r\n"
	if auth != "" {
		h += "Authorization: " + auth + "\r\n"
	}
	return h + "\r\n"
}

func requireEnvelope(t *testing.T, res *http.Response, status int, code string) {
	t.Helper()
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	require.Equal(t, status, res.StatusCode, string(raw))
	require.Contains(t, string(raw), `"code":"`+code+`"`)
}

// A resume cursor at an extreme value is refused, and the server lives.
func TestHostileLastEventID(t *testing.T) {
	a, hub := startTaskAPI(t)
	hub.Stream("t-hostile") // a task this apiserver holds: no lookup
	// A cursor taken would open a stream that never ends: bounded.
	client := &http.Client{Timeout: 10 * time.Second}
	for _, last := range []string{"9223372036854775807", "9223372036854775806", "16777216", "-2", "1e3", "99999999999999999999"} {
		req, _ := http.NewRequest("GET", a.base+"/v2/tasks/t-hostile/events", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Last-Event-ID", last)
		res, err := client.Do(req)
		require.NoError(t, err, "Last-Event-ID %s must be answered at once", last)
		raw, _ := io.ReadAll(res.Body)
		res.Body.Close()
		require.Equal(t, 400, res.StatusCode, "Last-Event-ID %s: %s", last, raw)
		require.Contains(t, string(raw), `"field":"Last-Event-ID"`)
	}
	require.Equal(t, 200, a.do("GET", "/health", "", nil).status, "the apiserver still serves")
}

// Bodies are bounded however they are framed: a chunked body past the
// limit is refused without being read to its end.
func TestHostileChunkedBodies(t *testing.T) {
	a, _ := startTaskAPI(t)
	for _, path := range []string{"/v1/chat/completions", "/v1/completions"} {
		res := rawSend(t, a.base, chunkedHead("POST", path, "Bearer "+token, "application/json"), chunks(8<<20))
		raw, _ := io.ReadAll(res.Body)
		res.Body.Close()
		require.Equal(t, 413, res.StatusCode, string(raw))
		require.Contains(t, string(raw), `"param":"body"`, "OpenAI's error shape")
	}
	res := rawSend(t, a.base, chunkedHead("POST", "/v2/tasks", "Bearer "+token, "application/json"), chunks(8<<20))
	requireEnvelope(t, res, 413, apiserver.CodeInvalidParams)
	// A chunked body within the limit is read and checked as any other.
	small := `{"model":"NO SUCH"}`
	res = rawSend(t, a.base, chunkedHead("POST", "/v2/tasks", "Bearer "+token, "application/json"), func(w io.Writer) {
		_, _ = fmt.Fprintf(w, "%x\r\n%s\r\n0\r\n\r\n", len(small), small)
	})
	requireEnvelope(t, res, 400, apiserver.CodeInvalidParams)
	// The token push route: refused unauthenticated, and bounded with its
	// stream token (derived as the apiserver derives it from the API token).
	push := tokenstream.PushPath("t-push")
	res = rawSend(t, a.base, chunkedHead("POST", push, "", "application/json"), chunks(8<<20))
	requireEnvelope(t, res, 401, apiserver.CodeBadToken)
	key := sha256.Sum256([]byte("llorch token stream\x00" + token))
	res = rawSend(t, a.base, chunkedHead("POST", push, "Bearer "+tokenstream.SinkToken(key[:], "t-push"), "application/json"), chunks(8<<20))
	requireEnvelope(t, res, 413, apiserver.CodeInvalidParams)
	require.Equal(t, 200, a.do("GET", "/health", "", nil).status)
}

// A multipart body is neither read nor spooled before authentication.
func TestHostileMultipartBeforeAuth(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where fasthttp would spool multipart files
	a := startAPI(t)
	const size = 32 << 20
	head := "POST /v2/catalog/models HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n" +
		fmt.Sprintf("Content-Length: %d\r\n\r\n", size)
	res := rawSend(t, a.base, head, func(w io.Writer) {
		// Half of the declared body: a server that parses the form first
		// waits for the rest and never answers.
		_, _ = io.WriteString(w, "--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"m.gguf\"\r\n\r\n")
		_, _ = w.Write(bytes.Repeat([]byte("x"), size/2))
	})
	requireEnvelope(t, res, 401, apiserver.CodeMissingToken)
	left, err := os.ReadDir(tmp)
	require.NoError(t, err)
	require.Empty(t, left, "nothing spooled to disk")
}

// Numbers at their extremes and malformed GPU lists are refused, naming
// the field, before anything is looked up or started.
func TestHostilePoolParams(t *testing.T) {
	a := startAPI(t)
	for _, ms := range []any{int64(9223372036854775807), 86400001, -1} {
		r := a.call("POST", "/v2/pools/p-hostile/drain", map[string]any{"deadline_ms": ms})
		requireError(t, r, 400, apiserver.CodeInvalidParams)
		require.Equal(t, "deadline_ms", r.body["field"], r.raw)
	}
	for _, mask := range []string{"a", "0,0", "0,", " 0", "-1", "64", "9223372036854775808", "0;1", strings.Repeat("1,", 40) + "1"} {
		r := a.call("POST", "/v2/pools", map[string]any{"pool_id": "p-hostile", "model_id": "m", "device_mask": mask})
		requireError(t, r, 400, apiserver.CodeInvalidParams)
		require.Equal(t, "device_mask", r.body["field"], "device_mask %q: %s", mask, r.raw)
	}
}

// A /v1 request refused for a field is counted by endpoint and field; a
// field OpenAI does not define counts as unrecognized, whatever its name.
func TestOpenAIRefusalsCounted(t *testing.T) {
	a, _ := startTaskAPI(t)
	for _, body := range []string{
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"no_such_` + strings.Repeat("x", 40) + `":1}`,
	} {
		r := a.do("POST", "/v1/chat/completions", "Bearer "+token, body)
		require.Equal(t, 400, r.status, r.raw)
	}
	require.Equal(t, 400, a.do("POST", "/v1/responses", "Bearer "+token, `{"model":"m","input":"x","store":true}`).status)
	m := a.do("GET", "/metrics", "", nil).raw
	require.Contains(t, m, `llorch_api_openai_refused_total{endpoint="chat.completions",param="tools"} 2`)
	require.Contains(t, m, `llorch_api_openai_refused_total{endpoint="chat.completions",param="unrecognized"} 1`)
	require.Contains(t, m, `llorch_api_openai_refused_total{endpoint="responses",param="store"} 1`)
}
