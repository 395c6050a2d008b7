package fuzz

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/tokenstream"
)

// answerWithin is how long the server has to start answering any input
// (every generation an input can ask for is bounded by the fixture pool's
// 512-token context); an SSE answer is read for sseFor only. 20 s, not
// less: on a loaded 2-vCPU machine one Temporal call was seen to take
// over 10 s, and a stall is what this catches, not slowness.
const (
	answerWithin = 20 * time.Second
	sseFor       = 300 * time.Millisecond
)

// codes are the stable codes of the error envelope. A new code goes here
// with the handler that answers it; INTERNAL is absent on purpose: no
// input may reach it.
var codes = map[string]bool{}

func init() {
	for _, c := range strings.Fields(`INVALID_PARAMS MISSING_TOKEN BAD_TOKEN NOT_FOUND METHOD_NOT_ALLOWED UNAVAILABLE
		NODE_NOT_FOUND NODE_LEFT NODE_AGENT_MANAGED NODE_GONE NO_NODE_AVAILABLE
		MODEL_NOT_FOUND MODEL_EXISTS MODEL_RETIRED MODEL_DEPRECATED MODEL_NOT_STAGED KEY_IN_USE OBJECT_NOT_FOUND OBJECT_MISSING NOT_GGUF CHECKSUM_MISMATCH STAGING_BUSY IN_USE DISK_FULL
		POOL_NOT_FOUND POOL_EXISTS POOL_ENDED POOL_BUSY POOL_DRAINING POOL_UNAVAILABLE RELOAD_FAILED RELOAD_IN_PROGRESS INSUFFICIENT_VRAM INSUFFICIENT_RAM
		TASK_NOT_FOUND TASK_EXISTS TASK_ENDED TASK_NOT_ON_NODE ADMISSION_REJECT DEADLINE_EXCEEDED STREAM_LIMIT STREAM_EXPIRED
		SESSION_NOT_FOUND SESSION_TURN_LIMIT SESSION_ENDED INVALID_SESSION_MESSAGE
		NODE_NOT_ONLINE FORBIDDEN QUOTA_EXCEEDED KEY_NOT_FOUND KEY_EXISTS`) {
		codes[c] = true
	}
}

// openAITypes are the error types of OpenAI's shape on /v1.
var openAITypes = map[string]bool{"invalid_request_error": true, "server_error": true, "requests": true}

// routeTable is the running apiserver's routes (set when the stack starts).
var routeTable []string

// FuzzAPI sends each input as one HTTP request over TCP to a running
// apiserver. route picks a route of the table (exactly, else by hash);
// params are its path parameters, one a line (empty: a fixture's id);
// query is the raw query string; headers are "Name: value" lines
// ($TOKEN, $SINK and $KEY stand for the API token, the stream token of the
// path's task and the fixture inference key's secret; without an
// Authorization line the right one is sent);
// body is the body, chunked when headers ask for it, with a declared
// Content-Length when headers give one (then the write side closes).
func FuzzAPI(f *testing.F) {
	f.Fuzz(func(t *testing.T, route, params, query, headers string, body []byte) {
		s := getStack(t)
		in := build(route, params, query, headers, body)
		if in == nil {
			return // would change a fixture (see protected)
		}
		// LLORCH_FUZZ_TRACE=file logs each input before it is sent: the one
		// a stalled worker is on is the last.
		if tr := os.Getenv("LLORCH_FUZZ_TRACE"); tr != "" {
			f, _ := os.OpenFile(tr, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
			fmt.Fprintf(f, "%s %s\n--- %q\n", time.Now().Format(time.StampMilli), in, headers)
			f.Close()
		}
		res, err := in.send(s.addr)
		if err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if err := in.check(res); err != nil {
			t.Fatalf("%s\n%s: %v", in, res, err)
		}
		if res.none != "" {
			t.Logf("%s %s: closed: %s", in.method, in.target, res.none)
		} else {
			t.Logf("%s %.120s: %d %.200s", in.method, in.target, res.status, res.body)
		}
		s.tidy(in, res)
		if st, _, err := s.call("GET", "/health", ""); err != nil || st != 200 {
			t.Fatalf("%s\nthe apiserver no longer answers /health (%d %v):\n%s", in, st, err, tail(s.logs))
		}
	})
}

// request is one input made concrete.
type request struct {
	method, route, path, target string
	header                      []string // "Name: value", in order
	body                        []byte
	chunked, declared           bool // framing chosen by the input
}

func (r *request) String() string {
	b := r.body
	if len(b) > 300 {
		b = b[:300]
	}
	return fmt.Sprintf("%s %s (route %s)\n%s\n\n%q", r.method, r.target, r.route, strings.Join(r.header, "\n"), b)
}

// pick is the route of the table an input names, else one by its hash;
// "RAW METHOD PATH" is sent as it is (unknown routes and methods).
func pick(route string) string {
	if rest, ok := strings.CutPrefix(route, "RAW "); ok {
		if m, p, ok := strings.Cut(rest, " "); ok && m != "" && strings.HasPrefix(p, "/") && !strings.Contains(p, ":") {
			return target(m, false) + " " + target(p, true)
		}
	}
	for _, r := range routeTable {
		if r == route {
			return r
		}
	}
	h := fnv.New32a()
	h.Write([]byte(route))
	return routeTable[h.Sum32()%uint32(len(routeTable))]
}

// fixture is the id a path parameter takes by default: one that exists,
// so handlers get past their lookups.
func fixture(path, param string) string {
	switch {
	case param == "model_id", strings.Contains(path, "/catalog/models/"):
		return fixModel
	case strings.Contains(path, "/nodes/"):
		return fixNode
	case strings.Contains(path, "/pools/"):
		return fixPool
	case strings.Contains(path, "/sessions/"):
		return fixSession
	case strings.Contains(path, "/keys/"):
		return fixKeyID
	default:
		return fixTask
	}
}

// target escapes only what cannot stand in a request line (spaces,
// controls, '#'): "..", "%zz", raw UTF-8 and "/" reach the server as
// sent. '?' stays raw in a query, and is escaped in a path parameter.
func target(s string, query bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c == 0x7f || c == '#' || (!query && c == '?') {
			fmt.Fprintf(&b, "%%%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func build(route, params, query, headers string, body []byte) *request {
	r := &request{route: pick(route), body: body}
	method, pattern, _ := strings.Cut(r.route, " ")
	r.method = method
	values := strings.Split(params, "\n")
	segs := strings.Split(pattern, "/")
	taskID := ""
	n := 0
	for i, seg := range segs {
		if !strings.HasPrefix(seg, ":") {
			continue
		}
		v := ""
		if n < len(values) {
			v = values[n]
		}
		n++
		if v == "" {
			v = fixture(pattern, seg[1:])
		}
		if strings.Contains(pattern, "/tasks/") || strings.Contains(pattern, "/streams/") {
			taskID = v
		}
		segs[i] = target(v, false)
	}
	r.path = strings.Join(segs, "/")
	r.target = r.path
	if query != "" {
		r.target += "?" + target(query, true)
	}
	if protected(method, pattern, r.path, body) {
		return nil
	}
	sink := sinkToken(taskID)
	auth := "Bearer " + token
	if strings.HasPrefix(pattern, "/internal/") {
		auth = "Bearer " + sink
	}
	has := map[string]bool{}
	for _, line := range strings.Split(headers, "\n") {
		line = strings.TrimRight(strings.ReplaceAll(line, "\r", ""), " ")
		name, value, ok := strings.Cut(line, ":")
		if !ok || name == "" {
			continue
		}
		value = strings.NewReplacer("$TOKEN", token, "$SINK", sink, "$KEY", fixKeySecret).Replace(value)
		lower := strings.ToLower(strings.TrimSpace(name))
		has[lower] = true
		switch lower {
		case "transfer-encoding":
			r.chunked = r.chunked || strings.Contains(strings.ToLower(value), "chunked")
		case "content-length":
			r.declared = true
		case "connection", "host":
			continue // the harness's own: one request per connection
		case "x-fuzz-repeat":
			// Not sent: the body is repeated, so a short input can be a
			// body past every limit (at most 2 MiB).
			if n, err := strconv.Atoi(strings.TrimSpace(value)); err == nil && n > 1 && len(body) > 0 {
				r.body = bytes.Repeat(body, min(n, 2<<20/len(body)+1))
			}
			continue
		}
		r.header = append(r.header, name+":"+value)
	}
	r.header = append([]string{"Host: fuzz", "Connection: close"}, r.header...)
	if !has["authorization"] {
		r.header = append(r.header, "Authorization: "+auth)
	}
	body = r.body
	if !has["content-type"] && len(body) > 0 {
		r.header = append(r.header, "Content-Type: application/json")
	}
	if !r.chunked && !r.declared && (len(body) > 0 || method == "POST" || method == "PUT" || method == "PATCH") {
		r.header = append(r.header, fmt.Sprintf("Content-Length: %d", len(body)))
	}
	return r
}

// protected: an input that would deregister, drain, reload, retire or
// delete a fixture, revoke the fixture key, or register the worker's node
// over REST, is not sent (the fixtures keep the task routes reaching the
// engine). Task, session and OpenAI routes may use every fixture.
func protected(method, pattern, path string, body []byte) bool {
	if method == "GET" || method == "HEAD" || strings.HasPrefix(pattern, "/v1/") ||
		strings.HasPrefix(pattern, "/v2/tasks") || strings.HasPrefix(pattern, "/v2/sessions") || strings.HasPrefix(pattern, "/internal/") {
		return false
	}
	if method == "DELETE" && strings.HasPrefix(pattern, "/v2/keys/") && fixKeyID != "" && strings.Contains(path, fixKeyID) {
		return true
	}
	for _, id := range []string{fixNode, fixPool, fixModel} {
		// Staging the fixture model, or a GC of the node, changes nothing
		// the pool needs (the engine holds its model).
		if strings.HasSuffix(pattern, "/models/:model_id") || strings.HasSuffix(pattern, "/gc") {
			continue
		}
		if strings.Contains(path, id) || bytes.Contains(body, []byte(id)) {
			return true
		}
	}
	return false
}

// sinkToken is the stream credential of task id, derived as the apiserver
// derives it from its API token.
func sinkToken(id string) string {
	key := sha256.Sum256([]byte("llorch token stream\x00" + token))
	return tokenstream.SinkToken(key[:], id)
}

// response is what came back.
type response struct {
	status int
	header http.Header
	body   []byte
	none   string // why there was no answer, when the server closed first
}

func (r *response) String() string {
	if r.none != "" {
		return "no answer: " + r.none
	}
	return fmt.Sprintf("HTTP %d %s\n%s", r.status, r.header.Get("Content-Type"), r.body)
}

func (r *request) send(addr string) (*response, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(answerWithin))
	var w bytes.Buffer
	fmt.Fprintf(&w, "%s %s HTTP/1.1\r\n%s\r\n\r\n", r.method, r.target, strings.Join(r.header, "\r\n"))
	if r.chunked {
		for b := r.body; len(b) > 0; {
			n := min(len(b), 61)
			fmt.Fprintf(&w, "%x\r\n%s\r\n", n, b[:n])
			b = b[n:]
		}
		w.WriteString("0\r\n\r\n")
	} else {
		w.Write(r.body)
	}
	// The server may answer (and close) before reading all of it.
	go func() {
		_, _ = conn.Write(w.Bytes())
		if r.declared || r.chunked {
			// A server waiting for bytes a declared length promised sees
			// their end instead of a stalled client.
			_ = conn.(*net.TCPConn).CloseWrite()
		}
	}()
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, &http.Request{Method: r.method})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("no answer within %s", answerWithin)
		}
		if r.declared || r.chunked || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			// The connection closed before an answer: a request the
			// server could not frame. It lives on (checked next).
			return &response{none: err.Error()}, nil
		}
		return nil, fmt.Errorf("reading the answer: %w", err)
	}
	defer res.Body.Close()
	out := &response{status: res.StatusCode, header: res.Header}
	if strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		_ = conn.SetReadDeadline(time.Now().Add(sseFor))
		out.body, _ = io.ReadAll(io.LimitReader(res.Body, 256<<10))
		return out, nil
	}
	out.body, err = io.ReadAll(io.LimitReader(res.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("HTTP %d: reading the body: %w", res.StatusCode, err)
	}
	return out, nil
}

// check holds for every answer: no 500, every refusal in the envelope
// with a stable code (OpenAI's shape on /v1), a correlation id.
func (r *request) check(res *response) error {
	if res.none != "" {
		if !r.declared && !r.chunked && !malformed(r) {
			return errors.New("the server closed the connection without answering a well-framed request")
		}
		return nil
	}
	if res.status >= 500 && res.status != 502 && res.status != 503 && res.status != 504 {
		return fmt.Errorf("status %d", res.status)
	}
	if res.header.Get("X-Correlation-Id") == "" {
		return errors.New("no X-Correlation-Id")
	}
	if res.status < 300 || r.method == "HEAD" {
		return nil
	}
	// A request the server could not frame never reached a route: the
	// envelope on /v1 too.
	if strings.HasPrefix(r.path, "/v1/") && !(res.status == 400 && (malformed(r) || r.chunked || r.declared) && bytes.HasPrefix(res.body, []byte(`{"code":`))) {
		var e struct {
			Error *struct {
				Message string  `json:"message"`
				Type    string  `json:"type"`
				Code    *string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal(res.body, &e); err != nil || e.Error == nil {
			return fmt.Errorf("not OpenAI's error shape: %v", err)
		}
		if e.Error.Message == "" || !openAITypes[e.Error.Type] {
			return fmt.Errorf("OpenAI error without a message or with type %q", e.Error.Type)
		}
		if e.Error.Code != nil && *e.Error.Code != "invalid_api_key" && *e.Error.Code != "rate_limit_exceeded" && !codes[strings.ToUpper(*e.Error.Code)] {
			return fmt.Errorf("OpenAI error code %q is not a stable code", *e.Error.Code)
		}
		return nil
	}
	var e struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(res.body, &e); err != nil {
		return fmt.Errorf("not the error envelope: %v", err)
	}
	if !codes[e.Code] || e.Message == "" {
		return fmt.Errorf("envelope code %q (message %q) is not a stable code", e.Code, e.Message)
	}
	return nil
}

// malformed: a request line or header the HTTP parser may refuse by
// closing the connection.
func malformed(r *request) bool {
	for _, c := range []byte(r.target) {
		if c >= 0x80 {
			return true
		}
	}
	for _, h := range r.header {
		name, value, _ := strings.Cut(h, ":")
		if strings.IndexFunc(value, func(c rune) bool { return c < ' ' && c != '\t' || c == 0x7f }) >= 0 {
			return true
		}
		if name != strings.TrimSpace(name) || strings.ContainsAny(name, " \t()<>@,;\\\"/[]?={}") ||
			strings.IndexFunc(name, func(c rune) bool { return c <= ' ' || c >= 0x7f }) >= 0 {
			return true
		}
		// A transfer coding other than chunked cannot be framed either.
		if strings.EqualFold(name, "Transfer-Encoding") && !strings.EqualFold(strings.TrimSpace(value), "chunked") {
			return true
		}
	}
	return false
}

// tidy undoes what an accepted input created, so state stays bounded by
// the fixtures: tasks are canceled, nodes deregistered, pools drained,
// models deleted, keys revoked.
func (s *stack) tidy(r *request, res *response) {
	if res.none != "" || res.status >= 300 || r.method != "POST" {
		return
	}
	var in, out map[string]any
	_ = json.Unmarshal(r.body, &in)
	_ = json.Unmarshal(res.body, &out)
	id := func(m map[string]any, k string) string { v, _ := m[k].(string); return v }
	switch pattern := strings.SplitN(r.route, " ", 2)[1]; {
	case pattern == "/v2/tasks":
		if t := id(out, "task_id"); t != "" && t != fixTask {
			_, _, _ = s.call("POST", "/v2/tasks/"+t+"/cancel", "")
		}
	case pattern == "/v2/nodes/register":
		if n := id(in, "node_id"); n != "" {
			_, _, _ = s.call("DELETE", "/v2/nodes/"+n, "")
		}
	case pattern == "/v2/pools":
		if p := id(in, "pool_id"); p != "" {
			_, _, _ = s.call("POST", "/v2/pools/"+p+"/drain", `{"deadline_ms":0}`)
		}
	case pattern == "/v2/keys":
		if k := id(out, "key_id"); k != "" && k != fixKeyID {
			_, _, _ = s.call("DELETE", "/v2/keys/"+k, "")
		}
	case pattern == "/v2/catalog/models":
		if m := id(out, "id"); m != "" && m != fixModel {
			_, _, _ = s.call("DELETE", "/v2/catalog/models/"+m, "")
		}
	}
}

// TestRoutesCovered: the corpus has an entry for every route of the table.
func TestRoutesCovered(t *testing.T) {
	table, err := routes()
	if err != nil {
		t.Fatal(err)
	}
	dir := "testdata/fuzz/FuzzAPI"
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, e := range entries {
		raw, err := os.ReadFile(dir + "/" + e.Name())
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(raw), "\n")
		if len(lines) > 1 {
			have[strings.TrimSuffix(strings.TrimPrefix(lines[1], `string("`), `")`)] = true
		}
	}
	for _, r := range table {
		// HEAD is fiber's twin of every GET: the GET's seed covers it.
		if !have[r] && !have["GET"+strings.TrimPrefix(r, "HEAD")] {
			t.Errorf("no seed in %s for route %q: add one to seeds (LLORCH_FUZZ_WRITE_SEEDS=1 go test -run TestWriteSeeds ./fuzz)", dir, r)
		}
	}
}
