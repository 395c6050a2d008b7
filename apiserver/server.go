package apiserver

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// Config is what the apiserver needs beyond its dependencies.
type Config struct {
	Addr  string
	Token string
	// AdvertiseURL is where nodes push token streams to this apiserver
	// (default http(s)://<the bound address>).
	AdvertiseURL string
	// TLS, when set, serves HTTPS (--tls-cert, --tls-key).
	TLS *tls.Config
}

// Deps are the clients the API works through.
type Deps struct {
	Nodes  *control.Nodes
	Models *control.Models
	Pools  *control.Pools
	Tasks  *control.Tasks
	Store  *modelstore.Store // nil: catalog routes answer UNAVAILABLE
	// Scheduler and Hub serve tasks; nil: the task routes are absent.
	Scheduler *scheduler.Scheduler
	Hub       *tokenstream.Hub
	Sessions  *control.Sessions // sessions' reads and ends, with Scheduler
	// Links finds a node's link URL from the cluster view (the
	// scheduler's LinkView); nil or unknown: the node's registration.
	Links interface {
		LinkURL(nodeID string) (string, bool)
	}
	// Keys resolves bearer tokens other than the bootstrap LLORCH_API_TOKEN
	// to the API key they belong to; nil: the bootstrap token alone.
	Keys KeyLookup
	// KeyRegistry creates, lists and revokes keys (the /v2/keys routes);
	// nil: those routes are absent.
	KeyRegistry *control.Keys
	// Quotas admits the tasks of keys with limits and reads keys' usage;
	// nil: limits are not enforced and usage answers UNAVAILABLE.
	Quotas *control.Quotas
	// LinkToken is presented to node links (LLORCH_LINK_TOKEN).
	LinkToken string
	// LinkHTTP reaches node links (trusting --link-ca); nil:
	// link.DefaultHTTP.
	LinkHTTP *http.Client
	Registry *prometheus.Registry
	Logger   *slog.Logger
	// Audit receives the audit trail (audit.go); nil: Logger.
	Audit *slog.Logger
}

// KeyLookup finds the API key a bearer token belongs to: false when the
// token is no live key's (unknown, revoked or expired).
type KeyLookup interface {
	Lookup(token string) (apikey.Principal, bool)
}

// Server is the REST API.
type Server struct {
	app       *fiber.App
	cfg       Config
	deps      Deps
	streamKey []byte
	closing   chan struct{} // closed at shutdown: event streams end
	closeOnce sync.Once
	metrics   *metrics
	key       *bearer.Key // nil: no token, every call is "anonymous"
	identity  string
	ln        net.Listener
	// follower feeds Hub from the nodes' task streams; nil without the
	// task routes.
	follower *tokenstream.Follower
	auditor  *auditor
	// entryCache holds the catalog entries admission reads (entrycache.go).
	entryCache entries
}

const (
	localIdentity    = "identity"
	localCorrelation = "correlation_id"
	localEndUser     = "end_user" // a /v1 request's user, for the audit trail
	headerCorrID     = "X-Correlation-Id"
	maxBodyBytes     = 1 << 20
)

// New builds the server; it does not listen yet.
func New(cfg Config, d Deps) (*Server, error) {
	if cfg.Token == "" && !bearer.Loopback(cfg.Addr) {
		return nil, fmt.Errorf("refusing to listen on %s without a token: set LLORCH_API_TOKEN (or LLORCH_API_TOKEN_FILE), or bind a loopback address", cfg.Addr)
	}
	s := &Server{cfg: cfg, deps: d, metrics: newMetrics(d.Registry), streamKey: streamKeyFor(cfg.Token), closing: make(chan struct{}),
		key: bearer.NewKey(cfg.Token, "LLORCH_API_TOKEN"), identity: "anonymous"}
	if cfg.Token != "" {
		s.identity = bearer.Fingerprint(cfg.Token)
	} else {
		d.Logger.Warn("no API token set: the API is open to every local process (loopback only)")
	}
	d.Registry.MustRegister(newNodeStateCollector(d.Nodes.Temporal, d.Nodes.Namespace))
	s.app = fiber.New(fiber.Config{
		AppName: "llorch",
		// Values from the request outlive handlers (metric labels, workflow
		// arguments, logs): fiber's zero-copy strings would be overwritten.
		Immutable:             true,
		DisableStartupMessage: true,
		BodyLimit:             maxBodyBytes,
		// Model uploads stream to S3; JSON bodies are still bounded by
		// decode (maxBodyBytes).
		StreamRequestBody: true,
		// No route takes a form: fasthttp would otherwise read and spool a
		// multipart body of any declared length before auth runs.
		DisablePreParseMultipartForm: true,
		ErrorHandler:                 s.errorHandler,
		ReadTimeout:                  30 * time.Second,
		IdleTimeout:                  2 * time.Minute,
	})
	if d.Scheduler != nil && d.Hub != nil && d.Tasks != nil {
		s.follower = &tokenstream.Follower{Hub: d.Hub, Status: d.Tasks.Status, LinkURL: s.linkURL,
			Subscribe: func(ctx context.Context, url, taskID string, after int, each func(task.Event) error) error {
				return (&link.Client{URL: url, Token: d.LinkToken, HTTP: d.LinkHTTP}).Events(ctx, taskID, after, each)
			},
			// The events of one read in one push: readers wake once a batch.
			SubscribeBatch: func(ctx context.Context, url, taskID string, after int, each func([]task.Event) error) error {
				return (&link.Client{URL: url, Token: d.LinkToken, HTTP: d.LinkHTTP}).EventBatches(ctx, taskID, after, each)
			},
			Ended: d.Scheduler.Finished, Seen: d.Tasks.Seen, Log: d.Logger, Metrics: tokenstream.NewFollowMetrics(d.Registry)}
	}
	s.app.Use(s.correlate)
	s.auditor = newAuditor(cmp.Or(d.Audit, d.Logger), d.Registry)
	s.app.Use(s.audit)
	s.routes()
	s.auditor.learn(s.app)
	s.refuseUnknownMethods()
	return s, nil
}

// refuseUnknownMethods answers a method fiber does not know (it would
// answer in plain text, before any middleware) with the envelope, as
// every other refusal (found by FuzzAPI).
func (s *Server) refuseUnknownMethods() {
	known := map[string]bool{}
	for _, m := range fiber.DefaultMethods {
		known[m] = true
	}
	srv := s.app.Server()
	next := srv.Handler
	srv.Handler = func(ctx *fasthttp.RequestCtx) {
		if known[string(ctx.Method())] {
			next(ctx)
			return
		}
		body, _ := json.Marshal(apiError(fiber.StatusMethodNotAllowed, CodeMethod, "no route %.32q %s", ctx.Method(), ctx.Path()).Envelope)
		ctx.Response.Header.Set(headerCorrID, uuid.NewString())
		ctx.SetContentType(fiber.MIMEApplicationJSON)
		ctx.SetStatusCode(fiber.StatusMethodNotAllowed)
		ctx.SetBody(body)
	}
}

// linkURL is where node nodeID's link serves: from the cluster view, else
// from the node's registration.
func (s *Server) linkURL(ctx context.Context, nodeID string) (string, error) {
	if s.deps.Links != nil {
		if u, ok := s.deps.Links.LinkURL(nodeID); ok {
			return u, nil
		}
	}
	nv, err := s.deps.Nodes.Get(ctx, nodeID)
	if err != nil {
		return "", fmt.Errorf("node %s: %w", nodeID, err)
	}
	if nv.Inventory.LinkURL == "" {
		return "", fmt.Errorf("node %s serves no node link (an older worker)", nodeID)
	}
	return nv.Inventory.LinkURL, nil
}

// App exposes the fiber app (tests drive it with app.Test).
func (s *Server) App() *fiber.App { return s.app }

// Listen binds synchronously so a taken port fails start-up at once.
func (s *Server) Listen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("apiserver cannot listen on %s: %w (change it with --addr or LLORCH_API_ADDR)", addr, err)
	}
	s.ln = ln
	served := ln
	if s.cfg.TLS != nil {
		served = tls.NewListener(ln, s.cfg.TLS)
	}
	go func() {
		if err := s.app.Listener(served); err != nil {
			s.deps.Logger.Error("apiserver stopped serving", "err", err)
		}
	}()
	s.deps.Logger.Info("apiserver listening", "addr", ln.Addr().String(), "tls", s.cfg.TLS != nil)
	return nil
}

// Addr is the bound address once listening.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Shutdown stops accepting and waits for in-flight requests.
// Open event streams end first (their clients reconnect with
// Last-Event-ID to another or the restarted apiserver).
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeOnce.Do(func() { close(s.closing) })
	if s.follower != nil {
		s.follower.Close()
	}
	return s.app.ShutdownWithContext(ctx)
}

var corrIDPattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// correlate echoes a sane X-Correlation-Id or sets a new one, and records
// metrics and one log line per request.
func (s *Server) correlate(c *fiber.Ctx) error {
	id := c.Get(headerCorrID)
	if !corrIDPattern.MatchString(id) {
		id = uuid.NewString()
	}
	c.Locals(localCorrelation, id)
	c.Set(headerCorrID, id)
	start := time.Now()
	err := c.Next()
	if err != nil {
		if herr := s.errorHandler(c, err); herr != nil {
			return herr
		}
	}
	route := c.Route().Path
	if route == "/" || route == "" {
		route = "unmatched"
	}
	status := c.Response().StatusCode()
	s.metrics.requests.WithLabelValues(route, c.Method(), strconv.Itoa(status)).Inc()
	s.metrics.latency.WithLabelValues(route, c.Method()).Observe(time.Since(start).Seconds())
	if route != "/metrics" && route != "/health" {
		s.log(c).Info("request", "method", c.Method(), "path", c.Path(), "status", status,
			"duration_ms", time.Since(start).Milliseconds())
	}
	return nil
}

func (s *Server) log(c *fiber.Ctx) *slog.Logger {
	l := s.deps.Logger.With("correlation_id", c.Locals(localCorrelation))
	if id, ok := c.Locals(localIdentity).(string); ok {
		l = l.With("identity", id)
	}
	return l
}

func identity(c *fiber.Ctx) string {
	id, _ := c.Locals(localIdentity).(string)
	return id
}

func (s *Server) health(c *fiber.Ctx) error {
	ctx, cancel := context.WithTimeout(c.UserContext(), 2*time.Second)
	defer cancel()
	if _, err := s.deps.Nodes.Temporal.CheckHealth(ctx, nil); err != nil {
		return c.Status(fiber.StatusServiceUnavailable).JSON(fiber.Map{"status": "degraded", "temporal": err.Error()})
	}
	return c.JSON(fiber.Map{"status": "ok", "temporal": "ok"})
}
