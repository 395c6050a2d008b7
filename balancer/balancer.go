// Package balancer is a round-robin HTTP reverse proxy over a fixed list of
// apiserver replicas: what `llorch dev --apiservers N` and the e2e tests put
// on the API port, and what a Kubernetes Service or nginx does in production.
//
// It is an ordinary L7 proxy on purpose: each request (not each connection)
// goes to the next backend, with no stickiness and no llorch-specific
// routing, so the tests behind it prove the replicas need none. Invariants:
//
//   - a backend that refuses the connection is skipped for that request and
//     the request goes to the next one; nothing reached the refusing backend,
//     so this is safe for any method;
//   - a refusing backend is marked down for a cooldown (and, with active
//     checks, until its /health answers); down backends are tried last, not
//     never, so a wrong "down" costs no request;
//   - when every backend refuses, the client gets 503 UNAVAILABLE in the API
//     error envelope with Retry-After;
//   - responses are flushed as they come (server-sent events stream), and a
//     backend that dies mid-response breaks the client's connection, which
//     an SSE client resumes with Last-Event-ID through the next backend.
package balancer

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
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/apiclient"
)

// CodeUnavailable is the envelope code of a request no backend took: the
// apiserver's own code for a control plane it cannot reach.
const CodeUnavailable = "UNAVAILABLE"

// Options tune a Balancer; zero values mean the defaults.
type Options struct {
	// Cooldown is how long a backend that refused a connection is tried
	// only after the others (default 3 s).
	Cooldown time.Duration
	// HealthInterval, when positive, probes every backend's HealthPath this
	// often: a failure marks it down, a 200 up again before its cooldown
	// ends (a restarted replica is back at once).
	HealthInterval time.Duration
	// HealthPath is the probe's path (default /health).
	HealthPath string
	// DialTimeout bounds connecting to one backend (default 2 s), so an
	// unreachable host costs little more than a refused connection.
	DialTimeout time.Duration
	// BackendTLS verifies https backends (RootCAs: the CA of the
	// apiservers' --tls-cert); nil: the system's roots. The balancer
	// proxies each request, so it speaks TLS to each backend itself.
	BackendTLS *tls.Config
	Logger     *slog.Logger
}

// Balancer is an http.Handler; see the package doc.
type Balancer struct {
	backends []*backend
	next     atomic.Uint64
	opts     Options
	tr       *http.Transport
	proxy    *httputil.ReverseProxy
	log      *slog.Logger
}

type backend struct {
	url *url.URL
	// downUntil is a unix-nano time; before it the backend is tried last.
	downUntil atomic.Int64
}

func (b *backend) down(now time.Time) bool { return now.UnixNano() < b.downUntil.Load() }

// errAllDown is a request every backend refused.
var errAllDown = errors.New("every apiserver replica refused the connection (or, for a GET, failed before answering)")

// New makes a balancer over backends, base URLs such as
// http://127.0.0.1:41233 (no path: requests keep theirs).
func New(backends []string, opts Options) (*Balancer, error) {
	if len(backends) == 0 {
		return nil, errors.New("balancer: no backends")
	}
	if opts.Cooldown <= 0 {
		opts.Cooldown = 3 * time.Second
	}
	if opts.HealthPath == "" {
		opts.HealthPath = "/health"
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 2 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	b := &Balancer{opts: opts, log: opts.Logger.With("component", "balancer")}
	for _, s := range backends {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return nil, fmt.Errorf("balancer: backend %q is not a base URL such as http://127.0.0.1:8081", s)
		}
		b.backends = append(b.backends, &backend{url: &url.URL{Scheme: u.Scheme, Host: u.Host}})
	}
	b.tr = &http.Transport{
		Proxy:       nil, // the backends are the replicas themselves, never behind an env proxy
		DialContext: (&net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		// Many concurrent streams per backend: keep their connections.
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		TLSClientConfig:     opts.BackendTLS,
	}
	b.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			// The backend is chosen per attempt in RoundTrip; this only
			// makes the URL absolute. Hop headers aside, every header
			// (Authorization, Last-Event-ID, ...) passes as is.
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", "backend"
			pr.Out.Host = pr.In.Host
			// Append to the client's chain, as nginx's
			// $proxy_add_x_forwarded_for does (Rewrite drops it).
			if xff := pr.In.Header.Values("X-Forwarded-For"); len(xff) > 0 {
				pr.Out.Header["X-Forwarded-For"] = xff
			}
			pr.SetXForwarded()
		},
		Transport:     roundTripper{b},
		FlushInterval: -1, // SSE: every write reaches the client at once
		ErrorHandler:  b.errorHandler,
		ErrorLog:      slog.NewLogLogger(b.log.Handler(), slog.LevelDebug),
	}
	return b, nil
}

func (b *Balancer) ServeHTTP(w http.ResponseWriter, r *http.Request) { b.proxy.ServeHTTP(w, r) }

// Close drops the idle connections to the backends.
func (b *Balancer) Close() { b.tr.CloseIdleConnections() }

// order is this request's backends: round-robin from the next one, those
// marked down after the others.
func (b *Balancer) order() []*backend {
	n := len(b.backends)
	start := int((b.next.Add(1) - 1) % uint64(n))
	now := time.Now()
	up := make([]*backend, 0, n)
	var down []*backend
	for i := range n {
		be := b.backends[(start+i)%n]
		if be.down(now) {
			down = append(down, be)
		} else {
			up = append(up, be)
		}
	}
	return append(up, down...)
}

func (b *Balancer) markDown(be *backend, why error) {
	until := time.Now().Add(b.opts.Cooldown).UnixNano()
	if old := be.downUntil.Swap(until); old < time.Now().UnixNano() {
		b.log.Warn("apiserver replica down", "backend", be.url.Host, "err", why, "cooldown", b.opts.Cooldown)
	}
}

func (b *Balancer) markUp(be *backend) {
	if be.downUntil.Swap(0) > time.Now().UnixNano() {
		b.log.Info("apiserver replica back", "backend", be.url.Host)
	}
}

type roundTripper struct{ b *Balancer }

// RoundTrip sends req to the backends in order until one accepts the
// connection.
func (rt roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	b := rt.b
	var body *sentBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &sentBody{rc: req.Body}
	}
	var refused []string
	for _, be := range b.order() {
		out := req.Clone(req.Context())
		out.URL.Scheme, out.URL.Host = be.url.Scheme, be.url.Host
		if body != nil {
			out.Body = body
			// Lets the transport resend on a fresh connection when a kept-alive
			// one turns out dead before anything was written.
			out.GetBody = func() (io.ReadCloser, error) {
				if body.started() {
					return nil, errors.New("request body already partly sent")
				}
				return body, nil
			}
		}
		res, err := b.tr.RoundTrip(out)
		if err == nil {
			return res, nil
		}
		// A connection never made is safe to retry for any request; one that
		// failed before any answer only for a bodiless idempotent request (a
		// replica killed with the request on its kept-alive connection), as
		// nginx's proxy_next_upstream does.
		again := isDialError(err) || (body == nil && idempotent(req.Method))
		if !again || body.started() || req.Context().Err() != nil {
			return nil, fmt.Errorf("apiserver replica %s: %w", be.url.Host, err)
		}
		b.markDown(be, err)
		refused = append(refused, be.url.Host)
	}
	return nil, fmt.Errorf("%w (%v)", errAllDown, refused)
}

// idempotent methods may be sent again after a failure.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return true
	}
	return false
}

// isDialError is a connection that was never made: a dead replica (refused)
// or an unreachable one (dial timeout). No byte of the request left.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// sentBody is a request body shared by the attempts of one request. The
// transport closes a body when a dial fails, which would spoil the retry,
// so Close is left to the server (which closes the request body after the
// handler); started says whether any byte was read, after which a retry
// would send a truncated body.
type sentBody struct {
	rc   io.ReadCloser
	mu   sync.Mutex
	read bool
}

func (s *sentBody) Read(p []byte) (int, error) {
	s.mu.Lock()
	s.read = true
	s.mu.Unlock()
	return s.rc.Read(p)
}

func (s *sentBody) Close() error { return nil }

func (s *sentBody) started() bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.read
}

// errorHandler answers a request that got no response in the API's error
// envelope: 503 when no backend took it, 502 when the backend failed
// mid-request (the request may have had effects: only the client knows
// whether to retry).
func (b *Balancer) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client is gone; nobody reads an answer
	}
	status := http.StatusBadGateway
	env := apiclient.Envelope{Code: CodeUnavailable, Message: err.Error()}
	if errors.Is(err, errAllDown) {
		status = http.StatusServiceUnavailable
		env.Message = "no apiserver replica is reachable: " + err.Error()
		env.Retriable, env.RetryAfterMs = true, 1000
		w.Header().Set("Retry-After", strconv.FormatInt(env.RetryAfterMs/1000, 10))
		w.Header().Set("X-Backoff-Ms", strconv.FormatInt(env.RetryAfterMs, 10))
	} else {
		// A GET is safe to send again; a POST that reached a replica may
		// have been applied.
		env.Retriable = r.Method == http.MethodGet || r.Method == http.MethodHead
	}
	b.log.Warn("request not served", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(env)
}

// Watch probes every backend's health path each HealthInterval until ctx
// ends; it returns at once when HealthInterval is not positive.
func (b *Balancer) Watch(ctx context.Context) {
	if b.opts.HealthInterval <= 0 {
		return
	}
	c := &http.Client{Transport: b.tr, Timeout: max(b.opts.HealthInterval, time.Second)}
	tick := time.NewTicker(b.opts.HealthInterval)
	defer tick.Stop()
	for {
		var wg sync.WaitGroup
		for _, be := range b.backends {
			wg.Go(func() { b.probe(ctx, c, be) })
		}
		wg.Wait()
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (b *Balancer) probe(ctx context.Context, c *http.Client, be *backend) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, be.url.String()+b.opts.HealthPath, nil)
	if err != nil {
		return
	}
	res, err := c.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			b.markDown(be, err)
		}
		return
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode == http.StatusOK {
		b.markUp(be)
	} else {
		b.markDown(be, fmt.Errorf("GET %s: %s", b.opts.HealthPath, res.Status))
	}
}

// Backends are the backends' base URLs, in order.
func (b *Balancer) Backends() []string {
	out := make([]string, len(b.backends))
	for i, be := range b.backends {
		out[i] = be.url.String()
	}
	return out
}
