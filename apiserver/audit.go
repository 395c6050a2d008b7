package apiserver

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/llorch/llorch/control"
)

// The audit trail: one structured event per state-changing call (every
// POST, PUT, PATCH and DELETE under /v2 and /v1), refused ones included (an
// attacker's failed drain is an event too), on its own logger
// (Deps.Audit: JSON lines with stream=audit). An event names who (key id
// and name, remote address), what (method and route pattern), the target
// (the ids in the path, or of what a create made), when, the outcome
// (status and error code) and the correlation id. It never holds a
// request body, a token or a secret: a task's prompt stays out.

// auditStream is the value of the stream attribute of every audit event,
// so one log pipeline can route them apart from the process's own log.
const auditStream = "audit"

// auditor holds the route table audit events are matched against, and
// their logger and counter.
type auditor struct {
	log    *slog.Logger
	events *prometheus.CounterVec
	routes []auditRoute
}

// auditRoute is a state-changing route: its method, its pattern and that
// split in segments (":x" matches any one).
type auditRoute struct {
	method, pattern string
	segs            []string
}

func newAuditor(log *slog.Logger, reg prometheus.Registerer) *auditor {
	return &auditor{log: log.With("stream", auditStream),
		events: promauto.With(reg).NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_audit_events_total",
			Help: "Audit events (state-changing API calls, refused ones included), by action (method and route pattern) and outcome (status class).",
		}, []string{"action", "outcome"})}
}

// audited says whether a call is one the trail records.
func audited(method, path string) bool {
	switch method {
	case http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete:
	default:
		return false
	}
	return strings.HasPrefix(path, "/v2/") || strings.HasPrefix(path, "/v1/")
}

// learn takes the state-changing routes from the app, once routes() ran.
func (a *auditor) learn(app *fiber.App) {
	for _, r := range app.GetRoutes(true) {
		if audited(r.Method, r.Path) {
			a.routes = append(a.routes, auditRoute{method: r.Method, pattern: r.Path, segs: strings.Split(r.Path, "/")})
		}
	}
}

// match finds the route a call is for, by its own table: a call refused
// by auth never reached its route, and fiber names the group's
// middleware. The match with the most literal segments wins (register
// before :id). target holds the path's ids, named by what they are.
func (a *auditor) match(method, path string) (pattern string, target map[string]string) {
	segs := strings.Split(path, "/")
	best := -1
	for _, r := range a.routes {
		if r.method != method || len(r.segs) != len(segs) {
			continue
		}
		literal, ok := 0, true
		for i, s := range r.segs {
			switch {
			case strings.HasPrefix(s, ":"):
				ok = ok && segs[i] != ""
			case s == segs[i]:
				literal++
			default:
				ok = false
			}
		}
		if ok && literal > best {
			best, pattern = literal, r.pattern
		}
	}
	if best < 0 {
		return "unmatched", nil
	}
	rs := strings.Split(pattern, "/")
	for i, s := range rs {
		if !strings.HasPrefix(s, ":") {
			continue
		}
		if target == nil {
			target = map[string]string{}
		}
		target[paramName(s[1:], rs[i-1])] = segs[i]
	}
	return pattern, target
}

// paramName is the audit name of a path parameter: ":model_id" is itself,
// ":id" takes its collection's name (/nodes/:id is node_id).
func paramName(param, collection string) string {
	if param != "id" {
		return param
	}
	return strings.TrimSuffix(collection, "s") + "_id"
}

// createdIDs are the fields of an answer that name what a create made
// (POST /v2/tasks answers task_id; POST /v2/pools the pool's spec).
var createdIDs = []string{"node_id", "pool_id", "model_id", "task_id", "session_id", "key_id"}

// answerTarget adds to target the ids a JSON answer names (of the object
// or its "pool"), where the path named none: "id" takes the collection's
// name. Only these fields are read, never the rest of the answer.
func answerTarget(c *fiber.Ctx, pattern string, target map[string]string) map[string]string {
	res := c.Response()
	if res.IsBodyStream() || !strings.HasPrefix(string(res.Header.ContentType()), fiber.MIMEApplicationJSON) || len(res.Body()) > 64<<10 {
		return target
	}
	var body map[string]json.RawMessage
	if json.Unmarshal(res.Body(), &body) != nil {
		return target
	}
	add := func(k string, raw json.RawMessage) {
		var v string
		if _, set := target[k]; set || json.Unmarshal(raw, &v) != nil || v == "" {
			return
		}
		if target == nil {
			target = map[string]string{}
		}
		target[k] = v
	}
	objs := []map[string]json.RawMessage{body}
	var inner map[string]json.RawMessage
	if json.Unmarshal(body["pool"], &inner) == nil {
		objs = append(objs, inner)
	}
	for _, o := range objs {
		for _, k := range createdIDs {
			if raw, ok := o[k]; ok {
				add(k, raw)
			}
		}
	}
	if raw, ok := body["id"]; ok && len(target) == 0 {
		segs := strings.Split(pattern, "/")
		add(paramName("id", segs[len(segs)-1]), raw)
	}
	return target
}

// errorCode is the code of an error answer: the envelope's, or the code
// (else the type) of OpenAI's shape on /v1.
func errorCode(c *fiber.Ctx) string {
	res := c.Response()
	if res.StatusCode() < 400 || res.IsBodyStream() || len(res.Body()) > 64<<10 {
		return ""
	}
	var e struct {
		Code  string `json:"code"`
		Error *struct {
			Code *string `json:"code"`
			Type string  `json:"type"`
		} `json:"error"`
	}
	if json.Unmarshal(res.Body(), &e) != nil {
		return ""
	}
	switch {
	case e.Code != "":
		return e.Code
	case e.Error != nil && e.Error.Code != nil && *e.Error.Code != "":
		return *e.Error.Code
	case e.Error != nil:
		return e.Error.Type
	}
	return ""
}

// audit is the middleware that records the trail. It renders a handler's
// error itself (as correlate would) to know the outcome.
func (s *Server) audit(c *fiber.Ctx) error {
	if !audited(c.Method(), c.Path()) {
		return c.Next()
	}
	start := time.Now()
	if err := c.Next(); err != nil {
		if herr := s.errorHandler(c, err); herr != nil {
			return herr
		}
	}
	a := s.auditor
	pattern, target := a.match(c.Method(), c.Path())
	status := c.Response().StatusCode()
	if status < 400 {
		target = answerTarget(c, pattern, target)
	}
	outcome := strconv.Itoa(status/100) + "xx"
	a.events.WithLabelValues(c.Method()+" "+pattern, outcome).Inc()
	p := principalOf(c) // zero when auth refused the call
	attrs := []any{"correlation_id", c.Locals(localCorrelation), "key_id", p.KeyID, "key_name", p.Name,
		"addr", c.IP(), "method", c.Method(), "route", pattern, "path", c.Path(), "status", status, "outcome", outcome,
		"duration_ms", time.Since(start).Milliseconds()}
	if code := errorCode(c); code != "" {
		attrs = append(attrs, "code", code)
	}
	if len(target) > 0 {
		attrs = append(attrs, slog.Any("target", target))
	}
	if u, _ := c.Locals(localEndUser).(string); u != "" {
		attrs = append(attrs, "end_user", u)
	}
	a.log.Info("audit", attrs...)
	return nil
}

// bindActor puts the authenticated caller into the request's context, where
// control finds it for the memos of the workflows the call starts or
// changes (see control.WithActor). auth calls it once the principal is set.
func bindActor(c *fiber.Ctx) {
	c.SetUserContext(control.WithActor(c.UserContext(), actorOf(c)))
}
