package link

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/node"
)

// DefaultMaxWaiters bounds the long-polls a link holds at once: one per
// apiserver replica is the need; the rest of the room is for restarts.
const DefaultMaxWaiters = 1024

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
	Log   *slog.Logger
	// MaxWaiters bounds concurrent long-polls; 0: DefaultMaxWaiters.
	MaxWaiters int
}

// Server serves a Source over HTTP.
type Server struct {
	source  *Source
	key     *bearer.Key
	log     *slog.Logger
	waiters chan struct{} // one element per long-poll in progress
	waiting atomic.Int64  // long-polls blocked in Wait, for tests

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
	return &Server{source: src, key: bearer.NewKey(opts.Token, TokenEnv), log: log,
		waiters: make(chan struct{}, n)}
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
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
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

// URL is where other hosts reach a link bound at bound: the host of
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
