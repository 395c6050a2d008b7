package link

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
)

const token = "link-secret"

type fixture struct {
	src  *Source
	srv  *Server
	url  string
	logs *testenv.Buffer
}

func serve(t *testing.T, opts Options) *fixture {
	t.Helper()
	f := &fixture{src: NewSource("n1"), logs: &testenv.Buffer{}}
	opts.Log = slog.New(slog.NewTextHandler(f.logs, nil))
	f.srv = NewServer(f.src, opts)
	require.NoError(t, f.srv.Listen("127.0.0.1:0"))
	t.Cleanup(func() {
		// Longer than net/http's 5 s: Shutdown closes a connection that
		// never carried a request (one a client's transport dialed and
		// did not use) only once it is 5 s old.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		require.NoError(t, f.srv.Shutdown(ctx))
	})
	f.url = URL("", f.srv.Addr())
	return f
}

func (f *fixture) client() *Client { return &Client{URL: f.url, Token: token} }

// get sends a raw GET with an Authorization header (none when "").
func (f *fixture) get(t *testing.T, pathQuery, auth string) (*http.Response, apiclient.Envelope) {
	t.Helper()
	req, err := http.NewRequest("GET", f.url+pathQuery, nil)
	require.NoError(t, err)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	var e apiclient.Envelope
	if res.StatusCode != 200 {
		require.NoError(t, json.Unmarshal(raw, &e), string(raw))
	}
	return res, e
}

func facts(busy int) node.LinkFacts {
	return node.LinkFacts{
		At:    time.Now().UTC(),
		Pools: []node.LinkPool{{PoolID: "p1", ModelID: "m", Epoch: 1, URL: "http://127.0.0.1:9", Ready: true, SlotsTotal: 2, SlotsBusy: busy}},
		GPUs:  []node.GPUUsage{{Index: 0, MemoryTotalBytes: 80 << 30, MemoryFreeBytes: 40 << 30}},
	}
}

// A missing, malformed or wrong credential gets 401 in the error envelope;
// the log names the caller by fingerprint and address, never the token.
func TestAuth(t *testing.T) {
	f := serve(t, Options{Token: token})
	for _, c := range []struct{ auth, code string }{
		{"", bearer.CodeMissing},
		{"Bearer wrong", bearer.CodeBad},
		{"Basic " + token, bearer.CodeBad},
		{"Bearer " + token + "x", bearer.CodeBad},
	} {
		res, e := f.get(t, node.LinkStatePath, c.auth)
		require.Equal(t, 401, res.StatusCode, c.auth)
		require.Equal(t, c.code, e.Code, c.auth)
		require.NotEmpty(t, e.Message)
	}
	res, e := f.get(t, "/elsewhere", "")
	require.Equal(t, 401, res.StatusCode, "unknown paths need the token too")
	require.Equal(t, bearer.CodeMissing, e.Code)

	logs := f.logs.String()
	require.NotContains(t, logs, token)
	require.Contains(t, logs, "presented="+bearer.Fingerprint("wrong"))
	require.Contains(t, logs, "presented=none")
	require.Contains(t, logs, "remote=127.0.0.1:")

	_, err := (&Client{URL: f.url, Token: "wrong"}).State(context.Background())
	var ae *apiclient.Error
	require.ErrorAs(t, err, &ae)
	require.Equal(t, 401, ae.Status)
	require.Equal(t, bearer.CodeBad, ae.Code)

	st, err := f.client().State(context.Background())
	require.NoError(t, err)
	require.Equal(t, "n1", st.NodeID)
	require.Equal(t, []node.LinkPool{}, st.Pools)

	res, e = f.get(t, "/link/v1/other", "Bearer "+token)
	require.Equal(t, 404, res.StatusCode)
	require.Equal(t, codeNotFound, e.Code)
}

// Without a token the link binds loopback only.
func TestListenRefusesOpenPublicAddress(t *testing.T) {
	s := NewServer(NewSource("n1"), Options{})
	require.ErrorIs(t, s.Listen("0.0.0.0:0"), ErrOpen)
	require.ErrorIs(t, s.Listen(":0"), ErrOpen)
	require.NoError(t, s.Shutdown(context.Background()), "never listened")

	taken := NewServer(NewSource("n1"), Options{Token: token})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	require.Error(t, taken.Listen(ln.Addr().String()), "a taken port fails at once")
}

func TestURL(t *testing.T) {
	bound := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 7001}
	require.Equal(t, "http://127.0.0.1:7001", URL("", bound))
	require.Equal(t, "http://gpu-7.lan:7001", URL("gpu-7.lan", bound))
	require.Equal(t, "http://10.0.0.7:7001", URL("10.0.0.7:9999", bound), "only the advertised host counts")
	require.Equal(t, "http://[fd00::7]:7001", URL("fd00::7", bound))
	require.Equal(t, "http://[fd00::7]:7001", URL("[fd00::7]:1", bound))
}

// A long-poll answers as soon as the version moves, and at its bound with
// the same version when nothing changed.
func TestWatch(t *testing.T) {
	f := serve(t, Options{Token: token})
	c := f.client()
	st, err := c.State(context.Background())
	require.NoError(t, err)
	v0 := st.Version

	got := make(chan node.LinkState, 1)
	go func() {
		st, err := c.Watch(context.Background(), v0)
		if err != nil {
			st.NodeID = err.Error()
		}
		got <- st
	}()
	testenv.Eventually(t, 5*time.Second, "long-poll waiting", func() (bool, string) {
		return f.srv.waiting.Load() == 1, fmt.Sprint(f.srv.waiting.Load())
	})
	start := time.Now()
	f.src.Set(facts(1))
	select {
	case st = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("long-poll did not answer the change")
	}
	require.Less(t, time.Since(start), time.Second)
	require.Equal(t, "n1", st.NodeID)
	require.Equal(t, v0+1, st.Version)
	require.Equal(t, 1, st.Pools[0].SlotsBusy)

	// Nothing changes: the answer comes at the bound, same version.
	c.Wait = 300 * time.Millisecond
	start = time.Now()
	same, err := c.Watch(context.Background(), st.Version)
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond)
	require.Less(t, time.Since(start), 3*time.Second)
	require.Equal(t, st.Version, same.Version)

	// A version the node does not hold (a follower of its predecessor)
	// answers at once.
	start = time.Now()
	other, err := c.Watch(context.Background(), st.Version+1000)
	require.NoError(t, err)
	require.Less(t, time.Since(start), time.Second)
	require.Equal(t, st.Version, other.Version)
}

func TestBadParameters(t *testing.T) {
	f := serve(t, Options{Token: token})
	for q, field := range map[string]string{
		"?after=x":             "after",
		"?after=-1":            "after",
		"?after=1&wait=5":      "wait",
		"?after=1&wait=61s":    "wait",
		"?after=1&wait=-1s":    "wait",
		"?wait=1s":             "wait",
		"?after=1&after=2":     "after",
		"?after=1&timeout=10s": "timeout",
	} {
		res, e := f.get(t, node.LinkStatePath+q, "Bearer "+token)
		require.Equal(t, 400, res.StatusCode, q)
		require.Equal(t, codeInvalidParams, e.Code, q)
		require.Equal(t, field, e.Field, q)
		require.Contains(t, e.Message, field, q)
	}
	res, _ := f.get(t, node.LinkStatePath+"?after=1&wait=0s", "Bearer "+token)
	require.Equal(t, 200, res.StatusCode, "wait=0s: a read that says which version it holds")

	req, _ := http.NewRequest("POST", f.url+node.LinkStatePath, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	post, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	post.Body.Close()
	require.Equal(t, 405, post.StatusCode)
}

// Beyond MaxWaiters long-polls, the link answers 503 with Retry-After;
// plain reads still work.
func TestWaiterCap(t *testing.T) {
	f := serve(t, Options{Token: token, MaxWaiters: 2})
	f.src.Set(facts(0))
	v := f.src.State().Version
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); _, _ = f.client().Watch(ctx, v) }()
	}
	testenv.Eventually(t, 5*time.Second, "two long-polls waiting", func() (bool, string) {
		return f.srv.waiting.Load() == 2, fmt.Sprint(f.srv.waiting.Load())
	})
	res, e := f.get(t, fmt.Sprintf("%s?after=%d&wait=10s", node.LinkStatePath, v), "Bearer "+token)
	require.Equal(t, 503, res.StatusCode)
	require.Equal(t, codeUnavailable, e.Code)
	require.True(t, e.Retriable)
	require.Equal(t, "1", res.Header.Get("Retry-After"))
	_, err := f.client().State(context.Background())
	require.NoError(t, err, "reads are not long-polls")
	cancel()
	wg.Wait()
	testenv.Eventually(t, 5*time.Second, "slots free again", func() (bool, string) {
		return len(f.srv.waiters) == 0, fmt.Sprint(len(f.srv.waiters))
	})
}

// Callers that go away leave no goroutine behind, on either side.
func TestNoGoroutineLeak(t *testing.T) {
	f := serve(t, Options{Token: token})
	f.src.Set(facts(0))
	v := f.src.State().Version
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = (&Client{URL: f.url, Token: token, HTTP: hc}).Watch(ctx, v)
		}()
	}
	testenv.Eventually(t, 10*time.Second, "50 long-polls waiting", func() (bool, string) {
		return f.srv.waiting.Load() == 50, fmt.Sprint(f.srv.waiting.Load())
	})
	cancel()
	wg.Wait()
	testenv.Eventually(t, 10*time.Second, "goroutines back to where they were", func() (bool, string) {
		n := runtime.NumGoroutine()
		return n <= before && f.srv.waiting.Load() == 0 && len(f.srv.waiters) == 0,
			fmt.Sprintf("%d goroutines (before: %d), %d waiting", n, before, f.srv.waiting.Load())
	})
}

// Shutdown answers the long-polls in progress at once instead of waiting
// out their bound.
func TestShutdownEndsLongPolls(t *testing.T) {
	src := NewSource("n1")
	srv := NewServer(src, Options{Token: token})
	require.NoError(t, srv.Listen("127.0.0.1:0"))
	c := &Client{URL: URL("", srv.Addr()), Token: token, Wait: node.LinkMaxWait}
	v := src.State().Version
	got := make(chan error, 1)
	go func() {
		st, err := c.Watch(context.Background(), v)
		if err == nil && st.Version != v {
			err = fmt.Errorf("version %d, want %d", st.Version, v)
		}
		got <- err
	}()
	testenv.Eventually(t, 5*time.Second, "long-poll waiting", func() (bool, string) {
		return srv.waiting.Load() == 1, ""
	})
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, srv.Shutdown(ctx))
	require.Less(t, time.Since(start), 2*time.Second)
	require.NoError(t, <-got, "the follower got the current state")
}

// The version moves with what placement reads, not with every figure.
func TestSourceVersions(t *testing.T) {
	s := NewSource("n1")
	v := s.State().Version
	require.Greater(t, v, uint64(time.Now().Add(-time.Minute).UnixMicro()), "starts at the start time")
	require.Less(t, v, uint64(1)<<53, "exact as a JSON number")

	f := facts(0)
	s.Set(f)
	require.Equal(t, v+1, s.State().Version, "the first facts")
	bump := func(what string, change func(*node.LinkFacts), want bool) {
		t.Helper()
		before := s.State().Version
		next := s.State().LinkFacts
		next.Pools = append([]node.LinkPool(nil), next.Pools...)
		next.GPUs = append([]node.GPUUsage(nil), next.GPUs...)
		next.Models = append([]node.ModelCopy(nil), next.Models...)
		change(&next)
		s.Set(next)
		require.Equal(t, want, s.State().Version != before, what)
		require.Equal(t, next.At, s.State().At, what+": the figures refresh either way")
	}
	bump("same facts", func(f *node.LinkFacts) { f.At = f.At.Add(time.Second) }, false)
	bump("a slot taken", func(f *node.LinkFacts) { f.Pools[0].SlotsBusy = 1 }, true)
	bump("a claim queued", func(f *node.LinkFacts) { f.Pools[0].Queued, f.Pools[0].Claims = 1, 2 }, true)
	bump("a service time observed", func(f *node.LinkFacts) { f.Pools[0].ServiceMs = 40 }, true)
	bump("a pool unready", func(f *node.LinkFacts) { f.Pools[0].Ready = false }, true)
	bump("utilisation", func(f *node.LinkFacts) { f.GPUs[0].UtilizationPercent = 90 }, false)
	bump("VRAM below the step", func(f *node.LinkFacts) { f.GPUs[0].MemoryFreeBytes -= 512 << 20 }, false)
	bump("VRAM drifting past the step from the last bump", func(f *node.LinkFacts) { f.GPUs[0].MemoryFreeBytes -= 512 << 20 }, true)
	bump("disk below the step", func(f *node.LinkFacts) { f.DiskFreeBytes += 100 << 20 }, false)
	bump("disk past it", func(f *node.LinkFacts) { f.DiskFreeBytes += 1 << 30 }, true)
	bump("a model staged", func(f *node.LinkFacts) {
		f.Models = append(f.Models, node.ModelCopy{ModelID: "m", SHA256: "ab", Size: 10})
	}, true)
	bump("a model used", func(f *node.LinkFacts) { f.Models[0].LastUsed = time.Now() }, false)
	bump("a GPU gone", func(f *node.LinkFacts) { f.GPUs = f.GPUs[:0] }, true)

	// Wait: at once for another version, at ctx's end otherwise.
	cur := s.State().Version
	require.Equal(t, cur, s.Wait(context.Background(), cur-1).Version)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	require.Equal(t, cur, s.Wait(ctx, cur).Version)

	js, err := json.Marshal(NewSource("n2").State())
	require.NoError(t, err)
	require.True(t, strings.Contains(string(js), `"pools":[]`) && strings.Contains(string(js), `"node_id":"n2"`), string(js))
}

// Task streams: bearer auth, a bad id, the wait for a task that never
// comes, the events in order after the caller's index until the final one,
// and cancel ending the stream for every subscriber at once.
func TestTaskEvents(t *testing.T) {
	hub := &tokenstream.Hub{}
	f := serve(t, Options{Token: token, Streams: hub})
	res, env := f.get(t, node.LinkTaskEventsPath("t1"), "")
	require.Equal(t, http.StatusUnauthorized, res.StatusCode)
	require.NotEmpty(t, env.Code)
	res, env = f.get(t, node.LinkTaskEventsPath("bad id!"), "Bearer "+token)
	require.Equal(t, http.StatusBadRequest, res.StatusCode)
	require.Equal(t, codeInvalidParams, env.Code)
	res, env = f.get(t, node.LinkTaskEventsPath("t1")+"?after=x", "Bearer "+token)
	require.Equal(t, http.StatusBadRequest, res.StatusCode)
	require.Equal(t, node.LinkEventsAfterParam, env.Field)
	res, env = f.get(t, node.LinkTaskEventsPath("t1")+"?wait=2m", "Bearer "+token)
	require.Equal(t, http.StatusBadRequest, res.StatusCode)
	require.Equal(t, node.LinkWaitParam, env.Field)
	start := time.Now()
	res, env = f.get(t, node.LinkTaskEventsPath("t-absent")+"?wait=50ms", "Bearer "+token)
	require.Equal(t, http.StatusNotFound, res.StatusCode)
	require.Equal(t, node.CodeTaskNotOnNode, env.Code)
	require.GreaterOrEqual(t, time.Since(start), 50*time.Millisecond)
	require.Nil(t, hub.Peek("t-absent"), "a subscriber creates no stream")
	res, env = f.get(t, node.LinkTaskCancelPath("t1"), "Bearer "+token)
	require.Equal(t, http.StatusMethodNotAllowed, res.StatusCode, env)

	// A subscriber that comes before the generation waits for it, then
	// gets everything after its index in order.
	got := make(chan []task.Event, 1)
	errs := make(chan error, 1)
	go func() {
		var evs []task.Event
		errs <- f.client().Events(context.Background(), "t1", 1, func(ev task.Event) error { evs = append(evs, ev); return nil })
		got <- evs
	}()
	testenv.Eventually(t, 10*time.Second, "subscriber waiting", func() (bool, string) {
		return len(f.srv.subs) == 1, fmt.Sprint(len(f.srv.subs))
	})
	st := hub.Open("t1", 0)
	_, _ = st.Push([]task.Event{{Type: "started", NodeID: "n1"}, tok(0), tok(1), tok(2)})
	_, _ = st.Push([]task.Event{tok(3), {Type: "end", TokensOut: 4}})
	require.NoError(t, <-errs)
	evs := <-got
	require.Equal(t, []string{"started", "token", "token", "end"}, types(evs))
	require.Equal(t, 2, evs[1].I)
	require.Equal(t, 3, evs[2].I)

	// Cancel: both subscribers get the error and their streams close.
	st = hub.Open("t2", 0)
	_, _ = st.Push([]task.Event{tok(0)})
	var wg sync.WaitGroup
	finals := make(chan task.Event, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = f.client().Events(context.Background(), "t2", -1, func(ev task.Event) error {
				if ev.Type == "error" {
					finals <- ev
				}
				return nil
			})
		}()
	}
	testenv.Eventually(t, 10*time.Second, "two subscribers", func() (bool, string) {
		return len(f.srv.subs) == 2, fmt.Sprint(len(f.srv.subs))
	})
	require.NoError(t, f.client().Cancel(context.Background(), "t2", "by test"))
	wg.Wait()
	for range 2 {
		ev := <-finals
		require.Equal(t, task.ErrCanceled, ev.Error.Code)
		require.Contains(t, ev.Error.Message, "by test")
	}
	_, _ = st.Push([]task.Event{tok(1)})
	require.Equal(t, 1, st.Tokens(), "no token after the cancel")
	var ae *apiclient.Error
	require.ErrorAs(t, f.client().Cancel(context.Background(), "t-absent", ""), &ae)
	require.Equal(t, node.CodeTaskNotOnNode, ae.Code)
}

// Beyond MaxStreams a subscription is refused with a retriable 503.
func TestTaskEventsCap(t *testing.T) {
	hub := &tokenstream.Hub{}
	f := serve(t, Options{Token: token, Streams: hub, MaxStreams: 1})
	go func() {
		_ = f.client().Events(context.Background(), "t1", -1, func(task.Event) error { return nil })
	}()
	testenv.Eventually(t, 10*time.Second, "one subscriber", func() (bool, string) {
		return len(f.srv.subs) == 1, fmt.Sprint(len(f.srv.subs))
	})
	res, env := f.get(t, node.LinkTaskEventsPath("t2")+"?wait=0s", "Bearer "+token)
	require.Equal(t, http.StatusServiceUnavailable, res.StatusCode)
	require.True(t, env.Retriable)
	hub.Open("t1", 0).Finish(task.Event{Type: "end"})
}

func tok(i int) task.Event { return task.Event{Type: "token", I: i, T: fmt.Sprint(i), Tok: int32(i)} }

func types(evs []task.Event) []string {
	var out []string
	for _, ev := range evs {
		out = append(out, ev.Type)
	}
	return out
}
