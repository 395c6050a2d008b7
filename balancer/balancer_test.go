package balancer

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apiclient"
)

// named is a backend that answers with its name and echoes what the
// balancer must pass through.
func named(t *testing.T, name string) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Backend", name)
		_ = json.NewEncoder(w).Encode(map[string]string{
			"backend": name, "body": string(body), "path": r.URL.RequestURI(),
			"auth": r.Header.Get("Authorization"), "last_event_id": r.Header.Get("Last-Event-ID"),
			"xff": r.Header.Get("X-Forwarded-For"),
		})
	}))
	t.Cleanup(s.Close)
	return s
}

// deadURL is a loopback address nothing listens on: connections are refused.
func deadURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return "http://" + addr
}

func front(t *testing.T, backends []string, opts Options) (*Balancer, *httptest.Server) {
	b, err := New(backends, opts)
	require.NoError(t, err)
	s := httptest.NewServer(b)
	t.Cleanup(func() { s.Close(); b.Close() })
	return b, s
}

func call(t *testing.T, c *http.Client, method, url, body string, hdr map[string]string) (int, http.Header, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	var m map[string]any
	raw, _ := io.ReadAll(res.Body)
	require.NoError(t, json.Unmarshal(raw, &m), string(raw))
	return res.StatusCode, res.Header, m
}

// Each request goes to the next backend, also over one kept-alive client
// connection, with its headers and body intact.
func TestRoundRobinPerRequest(t *testing.T) {
	a, b, c := named(t, "a"), named(t, "b"), named(t, "c")
	_, lb := front(t, []string{a.URL, b.URL, c.URL}, Options{})
	var dials atomic.Int32
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}}
	var got []string
	for i := range 6 {
		status, _, m := call(t, client, "POST", lb.URL+"/v2/tasks?x=1", fmt.Sprintf(`{"n":%d}`, i),
			map[string]string{"Authorization": "Bearer tok", "Last-Event-ID": "41", "X-Forwarded-For": "10.0.0.9"})
		require.Equal(t, 200, status)
		got = append(got, m["backend"].(string))
		assert.Equal(t, fmt.Sprintf(`{"n":%d}`, i), m["body"])
		assert.Equal(t, "/v2/tasks?x=1", m["path"])
		assert.Equal(t, "Bearer tok", m["auth"])
		assert.Equal(t, "41", m["last_event_id"])
		assert.Equal(t, "10.0.0.9, 127.0.0.1", m["xff"], "the client's chain, then the client")
	}
	assert.Equal(t, []string{"a", "b", "c", "a", "b", "c"}, got)
	assert.EqualValues(t, 1, dials.Load(), "one client connection carried every request")
}

// A dead backend is skipped with no error for the client, whatever the
// method, and is tried last until its cooldown ends.
func TestDeadBackendSkipped(t *testing.T) {
	a, c := named(t, "a"), named(t, "c")
	bal, lb := front(t, []string{a.URL, deadURL(t), c.URL}, Options{Cooldown: time.Hour})
	var got []string
	for i := range 6 {
		status, _, m := call(t, http.DefaultClient, "POST", lb.URL+"/x", fmt.Sprintf("body %d", i), nil)
		require.Equal(t, 200, status, m)
		assert.Equal(t, fmt.Sprintf("body %d", i), m["body"], "the retried request carries its whole body")
		got = append(got, m["backend"].(string))
	}
	// Request 2 found the dead one and went on to c; from then on the dead
	// one is down and its turn falls to the next live one, c.
	assert.Equal(t, []string{"a", "c", "c", "a", "c", "c"}, got)
	now := time.Now()
	assert.True(t, bal.backends[1].down(now))
	assert.False(t, bal.backends[0].down(now))
}

// A backend that comes back is used again: at once with active checks.
func TestHealthCheckBringsBackendBack(t *testing.T) {
	a := named(t, "a")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	bal, lb := front(t, []string{a.URL, "http://" + addr}, Options{Cooldown: time.Hour, HealthInterval: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go bal.Watch(ctx)
	require.Eventually(t, func() bool { return bal.backends[1].down(time.Now()) }, 10*time.Second, 10*time.Millisecond)
	ln, err = net.Listen("tcp", addr)
	require.NoError(t, err)
	back := &httptest.Server{Listener: ln, Config: &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"backend": "back"})
	})}}
	back.Start()
	defer back.Close()
	require.Eventually(t, func() bool { return !bal.backends[1].down(time.Now()) }, 10*time.Second, 10*time.Millisecond)
	seen := map[string]bool{}
	for range 2 {
		_, _, m := call(t, http.DefaultClient, "GET", lb.URL+"/", "", nil)
		seen[m["backend"].(string)] = true
	}
	assert.Equal(t, map[string]bool{"a": true, "back": true}, seen)
}

// Every backend refusing: 503 UNAVAILABLE in the envelope, with Retry-After.
func TestAllDown(t *testing.T) {
	_, lb := front(t, []string{deadURL(t), deadURL(t)}, Options{})
	status, hdr, m := call(t, http.DefaultClient, "POST", lb.URL+"/v2/tasks", `{}`, nil)
	require.Equal(t, 503, status)
	assert.Equal(t, "1", hdr.Get("Retry-After"))
	assert.Equal(t, "application/json", hdr.Get("Content-Type"))
	raw, _ := json.Marshal(m)
	var env apiclient.Envelope
	require.NoError(t, json.Unmarshal(raw, &env))
	assert.Equal(t, CodeUnavailable, env.Code)
	assert.True(t, env.Retriable)
	assert.EqualValues(t, 1000, env.RetryAfterMs)
	assert.Contains(t, env.Message, "no apiserver replica is reachable")
}

// Server-sent events reach the client as the backend writes them, not when
// the response ends.
func TestSSEFlushes(t *testing.T) {
	release := make(chan struct{})
	sse := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "id: 0\nevent: token\ndata: {}\n\n")
		w.(http.Flusher).Flush()
		<-release
		fmt.Fprintf(w, "id: 1\nevent: end\ndata: {}\n\n")
	}))
	defer sse.Close()
	_, lb := front(t, []string{sse.URL}, Options{})
	res, err := http.Get(lb.URL + "/v2/tasks/t/events")
	require.NoError(t, err)
	defer res.Body.Close()
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(res.Body)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	select {
	case l := <-lines:
		assert.Equal(t, "id: 0", l)
	case <-time.After(10 * time.Second):
		t.Fatal("the first event did not come through before the response ended")
	}
	close(release)
	var rest []string
	for l := range lines {
		rest = append(rest, l)
	}
	assert.Contains(t, rest, "event: end")
}

// A backend that dies mid-stream breaks the client's connection (so an SSE
// client reconnects), rather than ending the response as if complete.
func TestBackendDyingMidStreamBreaksResponse(t *testing.T) {
	sse := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "id: 0\nevent: token\ndata: {}\n\n")
		w.(http.Flusher).Flush()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer sse.Close()
	_, lb := front(t, []string{sse.URL}, Options{})
	res, err := http.Get(lb.URL + "/")
	require.NoError(t, err)
	defer res.Body.Close()
	_, err = io.ReadAll(res.Body)
	require.Error(t, err, "the client sees the break")
}

func TestNewRejectsBadBackends(t *testing.T) {
	_, err := New(nil, Options{})
	require.Error(t, err)
	for _, s := range []string{"127.0.0.1:80", "http://h:1/prefix", "ftp://h:1"} {
		_, err := New([]string{s}, Options{})
		require.Error(t, err, s)
		assert.Contains(t, err.Error(), s)
	}
}

// dropsRequests accepts connections and closes each once a request came
// in, answering nothing: a replica killed with the request on its
// connection.
func dropsRequests(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 4096)
				_, _ = conn.Read(buf)
				conn.Close()
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// A backend that takes a request and dies before answering: a GET goes on
// to the next replica, unseen by the client; a POST (it may have had
// effects) is a 502 the client decides about.
func TestIdempotentRetriedAfterBackendDies(t *testing.T) {
	a := named(t, "a")
	_, lb := front(t, []string{dropsRequests(t), a.URL}, Options{Cooldown: time.Hour})
	status, _, m := call(t, http.DefaultClient, "GET", lb.URL+"/v2/nodes", "", nil)
	require.Equal(t, 200, status, m)
	assert.Equal(t, "a", m["backend"])

	_, lb = front(t, []string{dropsRequests(t), a.URL}, Options{Cooldown: time.Hour})
	status, _, m = call(t, http.DefaultClient, "POST", lb.URL+"/v2/tasks", `{"n":1}`, nil)
	require.Equal(t, 502, status, m)
	assert.Equal(t, CodeUnavailable, m["code"])
}
