package link

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// DefaultMaxWaiters bounds the long-polls a link holds at once: one per
// apiserver replica is the need; the rest of the room is for restarts.
const DefaultMaxWaiters = 1024

// DefaultMaxStreams bounds the task event subscriptions a link serves at
// once: one per task with readers per replica.
const DefaultMaxStreams = 4096

// TokenEnv is where the link token is configured, as a refusal names it.
const TokenEnv = "LLORCH_LINK_TOKEN"

// Codes of the error envelope, as the REST API spells them.
const (
	codeInvalidParams = "INVALID_PARAMS"
	codeNotFound      = "NOT_FOUND"
	codeMethod        = "METHOD_NOT_ALLOWED"
	codeUnavailable   = "UNAVAILABLE"
)

// Connection bounds. A long-poll writes its answer up to node.LinkMaxWait
// after its request, so writes get that much more.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = node.LinkMaxWait + 10*time.Second
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 16 << 10
	retryAfter        = time.Second
)

// ErrOpen: a link without a token may only bind a loopback address.
var ErrOpen = errors.New("a node link without a token binds loopback addresses only")

// Options configure a Server.
type Options struct {
	// Token every request must present as a bearer token; "" leaves the
	// link open, which Listen allows on loopback addresses only.
	Token string
	// TLS, when set, serves HTTPS (--link-tls-cert, --link-tls-key); URL
	// then says https.
	TLS *tls.Config
	Log *slog.Logger
	// MaxWaiters bounds concurrent long-polls; 0: DefaultMaxWaiters.
	MaxWaiters int
	// Streams holds the node's task event streams (the generations write
	// them); nil: the task routes answer 404 TASK_NOT_ON_NODE at once.
	Streams *tokenstream.Hub
	// MaxStreams bounds concurrent event subscriptions; 0:
	// DefaultMaxStreams.
	MaxStreams int
	Metrics    *Metrics
	// Generator starts generations ahead of their workflows (the fast
	// start: POST node.LinkTaskGeneratePath); nil: that route answers 404.
	Generator Generator
}

// Metrics are the link's figures; nil: not counted.
type Metrics struct {
	subscriptions prometheus.Gauge
}

// NewMetrics registers the link's metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{subscriptions: prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "llorch_link_task_subscriptions", Help: "Task event streams the node link serves now."})}
	reg.MustRegister(m.subscriptions)
	return m
}

func (m *Metrics) subscribed(d float64) {
	if m != nil {
		m.subscriptions.Add(d)
	}
}

// Server serves a Source over HTTP.
type Server struct {
	source  *Source
	key     *bearer.Key
	log     *slog.Logger
	waiters chan struct{} // one element per long-poll in progress
	waiting atomic.Int64  // long-polls blocked in Wait, for tests
	streams *tokenstream.Hub
	subs    chan struct{} // one element per event subscription
	metrics *Metrics
	tls     *tls.Config
	gen     Generator
	// flushInterval: node.LinkFlushInterval; tests and benchmarks set it.
	flushInterval time.Duration

	srv    *http.Server
	ln     net.Listener
	cancel context.CancelFunc // ends every request's context: long-polls answer
}

// NewServer serves src; it does not listen yet.
func NewServer(src *Source, opts Options) *Server {
	n := opts.MaxWaiters
	if n <= 0 {
		n = DefaultMaxWaiters
	}
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	ns := opts.MaxStreams
	if ns <= 0 {
		ns = DefaultMaxStreams
	}
	return &Server{source: src, key: bearer.NewKey(opts.Token, TokenEnv), log: log,
		waiters: make(chan struct{}, n), streams: opts.Streams, subs: make(chan struct{}, ns), metrics: opts.Metrics, tls: opts.TLS,
		gen: opts.Generator, flushInterval: node.LinkFlushInterval}
}

// Listen binds addr synchronously (a taken port fails at once) and serves
// until Shutdown. Without a token it refuses a non-loopback address.
func (s *Server) Listen(addr string) error {
	if s.key == nil && !bearer.Loopback(addr) {
		return fmt.Errorf("%s: %w", addr, ErrOpen)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	base, cancel := context.WithCancel(context.Background())
	s.ln, s.cancel = ln, cancel
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		BaseContext:       func(net.Listener) context.Context { return base },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	if s.key == nil {
		s.log.Warn("no link token set: the node link is open to every local process (loopback only)", "addr", ln.Addr().String())
	}
	served := ln
	if s.tls != nil {
		served = tls.NewListener(ln, s.tls)
	}
	go func() {
		if err := s.srv.Serve(served); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("node link stopped serving", "err", err)
		}
	}()
	return nil
}

// Addr is the bound address (after Listen).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Shutdown answers every long-poll now, with the current state, then
// waits for the requests in progress until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	s.cancel()
	return s.srv.Shutdown(ctx)
}

// URL is where other hosts reach this link (after Listen): URL's, with
// https when it serves TLS.
func (s *Server) URL(advertise string) string {
	u := URL(advertise, s.Addr())
	if s.tls != nil {
		u = "https://" + strings.TrimPrefix(u, "http://")
	}
	return u
}

// URL is where other hosts reach a plain-HTTP link bound at bound: the host of
// advertise (a host or host:port) when set, else the bound host.
func URL(advertise string, bound net.Addr) string {
	_, port, _ := net.SplitHostPort(bound.String())
	host := advertise
	if h, _, err := net.SplitHostPort(advertise); err == nil {
		host = h
	}
	if host == "" {
		host, _, _ = net.SplitHostPort(bound.String())
	}
	return "http://" + net.JoinHostPort(host, port)
}

// ServeHTTP authenticates first, so a caller without the token learns
// nothing of the link, not even its paths.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if refused := s.key.Check(r.Header.Get("Authorization")); refused != nil {
		presented := refused.Presented
		if presented == "" {
			presented = "none"
		}
		s.log.Warn("node link refused a request", "code", refused.Code, "presented", presented,
			"remote", r.RemoteAddr, "path", r.URL.Path)
		writeError(w, http.StatusUnauthorized, apiclient.Envelope{Code: refused.Code, Message: refused.Message})
		return
	}
	if rest, ok := strings.CutPrefix(r.URL.Path, node.LinkTasksPrefix); ok {
		s.taskRoute(w, r, rest)
		return
	}
	if r.URL.Path != node.LinkStatePath {
		writeError(w, http.StatusNotFound, apiclient.Envelope{Code: codeNotFound, Message: "no node link path " + r.URL.Path})
		return
	}
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		writeError(w, http.StatusMethodNotAllowed, apiclient.Envelope{Code: codeMethod, Message: r.Method + " " + r.URL.Path + ": only GET"})
		return
	}
	s.state(w, r)
}

// state answers node.LinkStatePath: at once, or as a long-poll.
func (s *Server) state(w http.ResponseWriter, r *http.Request) {
	after, wait, watch, bad := parseWatch(r)
	if bad != nil {
		writeError(w, http.StatusBadRequest, *bad)
		return
	}
	st := s.source.State()
	if !watch || st.Version != after || wait == 0 {
		writeJSON(w, http.StatusOK, st)
		return
	}
	select {
	case s.waiters <- struct{}{}:
		defer func() { <-s.waiters }()
	default:
		w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter.Seconds())))
		writeError(w, http.StatusServiceUnavailable, apiclient.Envelope{Code: codeUnavailable, Retriable: true,
			RetryAfterMs: retryAfter.Milliseconds(),
			Message:      fmt.Sprintf("the node link follows %d long-polls already: retry, or read without %s", cap(s.waiters), node.LinkAfterParam)})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	s.waiting.Add(1)
	st = s.source.Wait(ctx, after)
	s.waiting.Add(-1)
	writeJSON(w, http.StatusOK, st)
}

// parseWatch reads ?after=V&wait=D; watch says whether after was given.
// Any other parameter, or one given twice, is an error too: a parameter
// the link would ignore is a caller's mistake.
func parseWatch(r *http.Request) (after uint64, wait time.Duration, watch bool, bad *apiclient.Envelope) {
	q := r.URL.Query()
	invalid := func(field, format string, args ...any) *apiclient.Envelope {
		return &apiclient.Envelope{Code: codeInvalidParams, Field: field, Message: field + ": " + fmt.Sprintf(format, args...)}
	}
	for k, v := range q {
		if k != node.LinkAfterParam && k != node.LinkWaitParam {
			return 0, 0, false, invalid(k, "unknown parameter (want %s and %s)", node.LinkAfterParam, node.LinkWaitParam)
		}
		if len(v) > 1 {
			return 0, 0, false, invalid(k, "given %d times", len(v))
		}
	}
	wait = node.LinkDefaultWait
	if v := q.Get(node.LinkWaitParam); q.Has(node.LinkWaitParam) {
		if !q.Has(node.LinkAfterParam) {
			return 0, 0, false, invalid(node.LinkWaitParam, "needs %s (the version you hold)", node.LinkAfterParam)
		}
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > node.LinkMaxWait {
			return 0, 0, false, invalid(node.LinkWaitParam, "%q: want a duration from 0s to %s, e.g. 30s", v, node.LinkMaxWait)
		}
		wait = d
	}
	if !q.Has(node.LinkAfterParam) {
		return 0, 0, false, nil
	}
	v := q.Get(node.LinkAfterParam)
	after, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, 0, false, invalid(node.LinkAfterParam, "%q: want the version you hold, a decimal number", v)
	}
	return after, wait, true, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, e apiclient.Envelope) { writeJSON(w, status, e) }

// taskRoute serves rest = "<task id>/events" (GET), "<task id>/cancel"
// (POST) or "<task id>/generate" (POST).
func (s *Server) taskRoute(w http.ResponseWriter, r *http.Request, rest string) {
	id, verb, ok := strings.Cut(rest, "/")
	method := map[string]string{"events": http.MethodGet, "cancel": http.MethodPost, "generate": http.MethodPost}[verb]
	if !ok || method == "" {
		writeError(w, http.StatusNotFound, apiclient.Envelope{Code: codeNotFound, Message: "no node link path " + r.URL.Path})
		return
	}
	if err := task.ValidateID(id); err != nil {
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "task_id", Message: "task id: " + err.Error()})
		return
	}
	if r.Method != method {
		w.Header().Set("Allow", method)
		writeError(w, http.StatusMethodNotAllowed, apiclient.Envelope{Code: codeMethod, Message: r.Method + " " + r.URL.Path + ": only " + method})
		return
	}
	switch verb {
	case "cancel":
		s.cancelTask(w, r, id)
		return
	case "generate":
		s.generate(w, r, id)
		return
	}
	s.taskEvents(w, r, id)
}

// maxReason bounds a cancel's reason.
const maxReason = 1024

// cancelTask ends the task's node stream with CANCELED, so no replica's
// reader gets another token; the workflow's cancel stops the generation.
// A task the node does not hold is a 404 (the caller's best effort ends).
func (s *Server) cancelTask(w http.ResponseWriter, r *http.Request, id string) {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxReason+1))
	if err != nil || len(b) > maxReason {
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "reason",
			Message: fmt.Sprintf("reason: want at most %d bytes of text", maxReason)})
		return
	}
	msg := "canceled"
	if reason := strings.TrimSpace(string(b)); reason != "" {
		msg += ": " + reason
	}
	// A generation started ahead of its workflow that no activity took
	// over stops here (a claimed one is stopped by the workflow's cancel).
	early := s.gen != nil && s.gen.CancelEarly(id, msg)
	var st *tokenstream.Stream
	if s.streams != nil {
		st = s.streams.Peek(id)
	}
	if st == nil {
		if early {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		writeError(w, http.StatusNotFound, apiclient.Envelope{Code: node.CodeTaskNotOnNode,
			Message: "task " + id + " has no stream on node " + s.nodeID()})
		return
	}
	if st.Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrCanceled, Message: msg}}) {
		s.log.Info("task stream canceled on the link", "task_id", id, "reason", msg)
	}
	w.WriteHeader(http.StatusNoContent)
}

// taskEvents streams the task's events after the caller's last token as
// NDJSON, flushed per batch, until the final event; an empty line every
// node.LinkKeepAlive while idle. After a write that carried tokens it
// holds back up to flushInterval, so the rest of a burst goes out in one
// write; the stream's end, or the request's, cuts that short.
func (s *Server) taskEvents(w http.ResponseWriter, r *http.Request, id string) {
	after, wait, bad := parseEvents(r)
	if bad != nil {
		writeError(w, http.StatusBadRequest, *bad)
		return
	}
	select {
	case s.subs <- struct{}{}:
		defer func() { <-s.subs }()
	default:
		w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter.Seconds())))
		writeError(w, http.StatusServiceUnavailable, apiclient.Envelope{Code: codeUnavailable, Retriable: true,
			RetryAfterMs: retryAfter.Milliseconds(),
			Message:      fmt.Sprintf("node %s serves %d task streams already: retry", s.nodeID(), cap(s.subs))})
		return
	}
	s.metrics.subscribed(1)
	defer s.metrics.subscribed(-1)
	var st *tokenstream.Stream
	if s.streams != nil {
		ctx, cancel := context.WithTimeout(r.Context(), wait)
		st = s.streams.Wait(ctx, id)
		cancel()
	}
	if st == nil {
		if r.Context().Err() != nil {
			return
		}
		writeError(w, http.StatusNotFound, apiclient.Envelope{Code: node.CodeTaskNotOnNode,
			Message: fmt.Sprintf("node %s holds no stream of task %s (waited %s)", s.nodeID(), id, wait)})
		return
	}
	defer st.Attach()() // the hub keeps a stream with a subscriber
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	cur := tokenstream.Cursor{Next: after + 1}
	idle := time.NewTimer(node.LinkKeepAlive)
	defer idle.Stop()
	hold := time.NewTimer(s.flushInterval)
	hold.Stop()
	defer hold.Stop()
	ended := st.Done()
	var buf []byte
	for first := true; ; first = false {
		evs, next, changed := st.Read(cur)
		cur = next
		if len(evs) > 0 || first {
			var tokens bool
			var err error
			if buf, tokens, err = appendEvents(buf[:0], evs); err != nil {
				return
			}
			if len(buf) > 0 {
				// A stream outlives the server's write timeout: each
				// batch gets its own.
				_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
				if _, err := w.Write(buf); err != nil {
					return
				}
			}
			if rc.Flush() != nil || cur.Done {
				return
			}
			if tokens && s.flushInterval > 0 {
				hold.Reset(s.flushInterval)
				select {
				case <-hold.C:
				case <-ended:
					hold.Stop()
				case <-r.Context().Done():
					return
				}
				continue
			}
		}
		idle.Reset(node.LinkKeepAlive)
		select {
		case <-changed:
		case <-r.Context().Done():
			return
		case <-idle.C:
			_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
			if _, err := w.Write([]byte("\n")); err != nil || rc.Flush() != nil {
				return
			}
			// The next Read returns nothing new: loop to wait again.
		}
	}
}

// appendEvents appends evs as NDJSON lines, as json.Encoder writes them
// (older replicas decode them with encoding/json); token events, nearly
// all of a stream, by appending bytes. tokens says whether evs held one.
func appendEvents(buf []byte, evs []task.Event) (_ []byte, tokens bool, err error) {
	for _, ev := range evs {
		if ev.Type == "token" && ev.NodeID == "" && ev.PoolID == "" && ev.TokensOut == 0 && ev.DecodeTimeMs == 0 &&
			ev.TokensIn == 0 && ev.StopType == "" && ev.Metrics == nil && ev.Error == nil && ev.LP == nil {
			buf, tokens = appendTokenLine(buf, ev), true
			continue
		}
		b, err := json.Marshal(ev)
		if err != nil {
			return buf, tokens, err
		}
		buf = append(append(buf, b...), '\n')
	}
	return buf, tokens, nil
}

// tokenLinePrefix starts a token event's line; the fields follow in
// task.Event's order, the others are empty and omitted.
const tokenLinePrefix = `{"type":"token","i":`

// appendTokenLine appends ev, a token event with no other field set, as
// json.Encoder writes it.
func appendTokenLine(buf []byte, ev task.Event) []byte {
	buf = append(buf, tokenLinePrefix...)
	buf = strconv.AppendInt(buf, int64(ev.I), 10)
	buf = append(buf, `,"t":`...)
	buf = tokenstream.AppendJSONString(buf, ev.T)
	buf = append(buf, `,"tok":`...)
	buf = strconv.AppendInt(buf, int64(ev.Tok), 10)
	return append(buf, '}', '\n')
}

// parseEvents reads ?after=I&wait=D of an event subscription.
func parseEvents(r *http.Request) (after int, wait time.Duration, bad *apiclient.Envelope) {
	q := r.URL.Query()
	invalid := func(field, format string, args ...any) *apiclient.Envelope {
		return &apiclient.Envelope{Code: codeInvalidParams, Field: field, Message: field + ": " + fmt.Sprintf(format, args...)}
	}
	for k, v := range q {
		if k != node.LinkEventsAfterParam && k != node.LinkWaitParam {
			return 0, 0, invalid(k, "unknown parameter (want %s and %s)", node.LinkEventsAfterParam, node.LinkWaitParam)
		}
		if len(v) > 1 {
			return 0, 0, invalid(k, "given %d times", len(v))
		}
	}
	after, wait = -1, node.LinkDefaultWait
	if q.Has(node.LinkEventsAfterParam) {
		v := q.Get(node.LinkEventsAfterParam)
		n, err := strconv.Atoi(v)
		if err != nil || n < -1 {
			return 0, 0, invalid(node.LinkEventsAfterParam, "%q: want the last token index you hold, -1 for none", v)
		}
		after = n
	}
	if q.Has(node.LinkWaitParam) {
		v := q.Get(node.LinkWaitParam)
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > node.LinkMaxWait {
			return 0, 0, invalid(node.LinkWaitParam, "%q: want a duration from 0s to %s, e.g. 30s", v, node.LinkMaxWait)
		}
		wait = d
	}
	return after, wait, nil
}

func (s *Server) nodeID() string { return s.source.State().NodeID }
