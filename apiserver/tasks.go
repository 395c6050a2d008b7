package apiserver

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"go.temporal.io/api/serviceerror"
	"log/slog"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

var errShuttingDown = errors.New("apiserver shutting down")

// Task error codes.
const (
	CodeTaskNotFound    = "TASK_NOT_FOUND"
	CodeTaskExists      = "TASK_EXISTS"
	CodeTaskEnded       = "TASK_ENDED"
	CodeAdmission       = task.ErrAdmissionReject
	CodePoolUnavailable = task.ErrPoolUnavailable
	CodeModelDeprecated = task.ErrModelDeprecated
	CodeSessionNotFound = "SESSION_NOT_FOUND"
	CodeSessionFull     = "SESSION_TURN_LIMIT"
)

// Bounds of a task request.
const (
	maxPromptBytes  = 256 << 10
	maxMessages     = 256
	defaultMaxToken = 256
	keepAlive       = 15 * time.Second
	// maxCursor bounds a resume cursor: a token index is below any
	// model's context, and n+1 of a larger one overflows.
	maxCursor = 1 << 24
)

// taskRequest is the body of POST /v2/tasks (the original plan's fields).
type taskRequest struct {
	TaskID      string          `json:"task_id"`
	SessionID   string          `json:"session_id"`
	ModelRef    string          `json:"model_ref"`
	Model       string          `json:"model"`
	Prompt      *string         `json:"prompt"`
	Messages    []task.Message  `json:"messages"`
	MaxTokens   *int            `json:"max_tokens"`
	DeadlineMs  *int64          `json:"deadline_ms"`
	Priority    string          `json:"priority"`
	Seed        *int64          `json:"seed"`
	Temperature *float64        `json:"temperature"`
	TopK        *int            `json:"top_k"`
	TopP        *float64        `json:"top_p"`
	Stop        []string        `json:"stop"`
	Determinism string          `json:"determinism"`
	Placement   *task.Placement `json:"placement"`
	// The original contract's placement and workload fields.
	Workload string `json:"workload"` // completion (the default)
	Engine   string `json:"engine"`   // llamacpp (any), builtin, llama-server
	Ctx      *int   `json:"ctx"`      // the slot context the task needs
	// Fields of the original contract llorch does not act on yet: refused
	// naming them when set, never dropped.
	KVHint                *string         `json:"kv_hint"` // reuse (the default) or cold
	ExpectedTokens        json.RawMessage `json:"expected_tokens"`
	SamplerProfileVersion json.RawMessage `json:"sampler_profile_version"`
	Inputs                json.RawMessage `json:"inputs"`
}

// maxCtx bounds ctx: no model's slot holds more.
const maxCtx = 1 << 20

// newTask validates a request into the workflow's input. field names the
// JSON field each check is about, in the caller's API's spelling.
type taskInput struct {
	id, session, model string
	prompt             *string
	messages           []task.Message
	maxTokens          *int
	deadlineMs         *int64
	priority           string
	params             task.Params
	placement          task.Placement
	temperature        *float64
	topK               *int
	topP               *float64
	seed               *int64
}

// parseTask checks everything about a task request that needs no lookup.
func parseTask(in taskInput, maxTokensField string) (task.Request, error) {
	var req task.Request
	if in.id == "" {
		in.id = newTaskID()
	} else if err := task.ValidateID(in.id); err != nil {
		return req, invalidParam("task_id", "%v", err)
	}
	if err := model.ValidateID(in.model); err != nil {
		return req, invalidParam("model", "%v", err)
	}
	switch {
	case in.prompt != nil && len(in.messages) > 0:
		return req, invalidParam("prompt", "send prompt or messages, not both")
	case in.prompt == nil && len(in.messages) == 0:
		return req, invalidParam("prompt", "a prompt or messages is required")
	case in.prompt != nil && (len(*in.prompt) == 0 || len(*in.prompt) > maxPromptBytes):
		return req, invalidParam("prompt", "must be 1-%d bytes", maxPromptBytes)
	case len(in.messages) > maxMessages:
		return req, invalidParam("messages", "at most %d messages", maxMessages)
	}
	total := 0
	for i, m := range in.messages {
		switch m.Role {
		case "system", "user", "assistant", "developer":
		default:
			return req, invalidParam(fmt.Sprintf("messages[%d].role", i), "want system, user, assistant or developer, got %q", m.Role)
		}
		total += len(m.Content)
	}
	if total > maxPromptBytes {
		return req, invalidParam("messages", "contents exceed %d bytes", maxPromptBytes)
	}
	p := task.Params{MaxTokens: defaultMaxToken, Temperature: 0.8, TopK: 40, TopP: 0.95, Seed: -1}
	if in.temperature != nil {
		if *in.temperature < 0 || *in.temperature > 2 {
			return req, invalidParam("temperature", "must be 0-2")
		}
		p.Temperature = *in.temperature
	}
	if in.topK != nil {
		if *in.topK < 0 {
			return req, invalidParam("top_k", "must be >= 0")
		}
		p.TopK = *in.topK
	}
	if in.topP != nil {
		if *in.topP <= 0 || *in.topP > 1 {
			return req, invalidParam("top_p", "must be in (0, 1]")
		}
		p.TopP = *in.topP
	}
	if in.seed != nil {
		if *in.seed < -1 || *in.seed > 1<<32-1 {
			return req, invalidParam("seed", "must be -1 (random) or 0-4294967295")
		}
		p.Seed = *in.seed
	}
	if len(in.params.Stop) > 4 {
		return req, invalidParam("stop", "at most 4 stop sequences")
	}
	for _, st := range in.params.Stop {
		if st == "" || len(st) > 64 {
			return req, invalidParam("stop", "each stop sequence must be 1-64 bytes")
		}
	}
	p.Stop = in.params.Stop
	p.Grammar = in.params.Grammar                                         // made by this server (response_format), bounded there
	p.Logprobs, p.TopLogprobs = in.params.Logprobs, in.params.TopLogprobs // checked by the endpoint
	prio := task.Priority(in.priority)
	switch prio {
	case "":
		prio = task.Interactive
	case task.Interactive, task.Batch:
	default:
		return req, invalidParam("priority", "want interactive or batch, got %q", in.priority)
	}
	var deadline time.Duration
	if in.deadlineMs != nil {
		if *in.deadlineMs <= 0 || *in.deadlineMs > int64(24*time.Hour/time.Millisecond) {
			return req, invalidParam("deadline_ms", "must be > 0 and at most 86400000")
		}
		deadline = time.Duration(*in.deadlineMs) * time.Millisecond
	}
	pl := in.placement
	switch pl.Mode {
	case "", "auto", "prefer":
	case "pin":
		if pl.PinPoolID == "" {
			return req, invalidParam("placement.pin_pool_id", "required with mode pin")
		}
	default:
		return req, invalidParam("placement.mode", "want auto, pin or prefer, got %q", pl.Mode)
	}
	for _, id := range append(append([]string{pl.PinPoolID}, pl.PreferPools...), pl.AvoidPools...) {
		if id != "" {
			if err := pool.ValidateID(id); err != nil {
				return req, invalidParam("placement", "%v", err)
			}
		}
	}
	if pl.NodeID != "" {
		if err := node.ValidateID(pl.NodeID); err != nil {
			return req, invalidParam("placement.node_id", "%v", err)
		}
	}
	if in.session != "" {
		if err := task.ValidateID(in.session); err != nil {
			return req, invalidParam("session_id", "%v", err)
		}
	}

	if in.maxTokens != nil && *in.maxTokens < 1 {
		return req, invalidParam(maxTokensField, "must be at least 1")
	}
	req = task.Request{TaskID: in.id, SessionID: in.session, ModelID: in.model, Messages: in.messages, Params: p,
		Priority: prio, Deadline: deadline, Placement: pl}
	if in.prompt != nil {
		req.Prompt = *in.prompt
	}
	return req, nil
}

func (s *Server) buildTask(c *fiber.Ctx, in taskInput, maxTokensField string) (task.Request, model.Entry, error) {
	req, err := parseTask(in, maxTokensField)
	if err != nil {
		return req, model.Entry{}, err
	}
	e, err := s.admissionEntry(c.UserContext(), in.model)
	if err != nil {
		return req, e, err
	}
	if e.Lifecycle != model.Active {
		return req, e, apiError(fiber.StatusGone, CodeModelDeprecated, "model %s is %s: it takes no new tasks", e.ID, e.Lifecycle)
	}
	// A slot of the model's roomiest pool bounds a generation; without
	// pools of known size, the model's trained context does.
	ctxLen := s.deps.Scheduler.MaxContext(e.ID)
	if ctxLen == 0 {
		ctxLen = int(e.Metadata.ContextLength)
	}
	if in.maxTokens != nil {
		if ctxLen > 0 && *in.maxTokens > ctxLen {
			return req, e, invalidParam(maxTokensField, "must be 1-%d (the model's context)", ctxLen)
		}
		req.Params.MaxTokens = *in.maxTokens
	} else if ctxLen > 0 {
		req.Params.MaxTokens = min(req.Params.MaxTokens, ctxLen)
	}
	req.ModelID, req.CorrelationID, req.EnqueuedAt = e.ID, correlationID(c), time.Now().UTC()
	req.Owner = principalOf(c).KeyID
	if s.follower == nil {
		// Without a follower the node pushes to this apiserver (the older
		// path); with one, every replica reads the node's link instead.
		req.Sink = task.Sink{URL: s.sinkURL(), Token: tokenstream.SinkToken(s.streamKeyNow(), req.TaskID)}
	}
	return req, e, nil
}

func correlationID(c *fiber.Ctx) string {
	id, _ := c.Locals(localCorrelation).(string)
	return id
}

func newTaskID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "t-" + hex.EncodeToString(b)
}

// submit admits a task (the scheduler starts its workflow) and opens its
// stream. ahead (a /v1 stream, whose client's leaving cancels the task)
// does not wait for the workflow's start to be durable when the
// generation was sent to its node ahead of it: a start that fails later
// ends the task's stream with the error.
func (s *Server) submit(c *fiber.Ctx, req task.Request, ahead bool) (scheduler.Admission, error) {
	req, release, err := s.admitQuota(c, req)
	if err != nil {
		return scheduler.Admission{}, err
	}
	var adm scheduler.Admission
	if ahead {
		// The workflow starts once the stream has its first token (or
		// ended): its start's work does not compete with the first token.
		first := make(chan struct{})
		go firstToken(s.deps.Hub.Stream(req.TaskID), first)
		adm, err = s.deps.Scheduler.AdmitAhead(c.UserContext(), req, first)
	} else {
		adm, err = s.deps.Scheduler.Admit(c.UserContext(), req)
	}
	if err != nil {
		release()
	}
	prepared := adm.Prepared
	log := s.log(c)
	if prepared != nil {
		log.Info("pool started for a task", "pool_id", prepared.PoolID, "node_id", prepared.NodeID, "model_id", req.ModelID, "task_id", req.TaskID)
	}
	if err != nil {
		return adm, admissionError(c, req, err)
	}
	st := s.deps.Hub.Stream(req.TaskID) // the stream exists before its first event
	if prepared != nil {
		_, _ = st.Push([]task.Event{{Type: "metrics", Metrics: map[string]any{
			"preparing": "starting pool " + prepared.PoolID + " for model " + prepared.ModelID + " on node " + prepared.NodeID,
			"pool_id":   prepared.PoolID, "node_id": prepared.NodeID}}})
	}
	if ahead {
		go func() {
			if err := adm.Durable(context.Background()); err != nil {
				release()
				log.Warn("task not started: its workflow did not start after its generation was sent ahead", "task_id", req.TaskID, "err", err)
				st.Finish(task.Event{Type: "error", Error: &task.Error{Code: CodeUnavailable, Retriable: true, RetryAfterMs: 1000,
					Message: "task " + req.TaskID + " did not start: " + err.Error()}})
			}
		}()
	}
	if s.follower != nil {
		// The granted slot says where the generation runs: the first token
		// need not wait for a status read.
		var hint *task.Where
		if w, ok := s.deps.Scheduler.Granted(req.TaskID); ok {
			hint = &w
		}
		s.follower.Start(req.TaskID, hint)
	}
	log.Info("task admitted", "task_id", req.TaskID, "model_id", req.ModelID, "priority", req.Priority,
		"queue_position", adm.Position, "session_id", req.SessionID, "fast_start", adm.FastStart)
	return adm, nil
}

// firstToken closes first once st holds a token or has ended, or after a
// while (the scheduler bounds its own wait).
func firstToken(st *tokenstream.Stream, first chan struct{}) {
	defer close(first)
	limit := time.NewTimer(time.Second)
	defer limit.Stop()
	for {
		_, _, changed := st.Read(tokenstream.Cursor{Done: true, Next: 1 << 30})
		if st.Tokens() > 0 || st.Ended() {
			return
		}
		select {
		case <-changed:
		case <-limit.C:
			return
		}
	}
}

// admissionError is a refused admission as the API answers it.
func admissionError(c *fiber.Ctx, req task.Request, err error) error {
	var noPool *scheduler.NoPoolError
	var full *scheduler.QueueFullError
	var session *scheduler.SessionFullError
	switch {
	case errors.As(err, &noPool):
		e := apiError(fiber.StatusServiceUnavailable, CodePoolUnavailable, "%v; create one with POST /v2/pools", noPool)
		e.Retriable, e.RetryAfterMs = true, 5000
		c.Set(fiber.HeaderRetryAfter, "5")
		return e
	case errors.As(err, &session):
		return apiError(fiber.StatusConflict, CodeSessionFull, "%v", session)
	case errors.As(err, &full):
		backoff := full.Backoff
		e := apiError(fiber.StatusTooManyRequests, CodeAdmission, "%v", full)
		e.Retriable, e.RetryAfterMs, e.PolicyLabel = true, backoff.Milliseconds(), "reject"
		c.Set(fiber.HeaderRetryAfter, strconv.Itoa(max(1, int(backoff.Round(time.Second)/time.Second))))
		c.Set("X-Backoff-Ms", strconv.FormatInt(backoff.Milliseconds(), 10))
		return e
	case errors.Is(err, control.ErrSessionNotFound): // another key's session
		return sessionNotFound(req.SessionID)
	case errors.Is(err, control.ErrTaskExists):
		return apiError(fiber.StatusConflict, CodeTaskExists, "task %s exists", req.TaskID)
	}
	return err
}

func (s *Server) createTask(c *fiber.Ctx) error {
	var r taskRequest
	if err := decode(c, &r, false); err != nil {
		return err
	}
	in, err := r.input()
	if err != nil {
		return err
	}
	req, _, err := s.buildTask(c, in, "max_tokens")
	if err != nil {
		return err
	}
	adm, err := s.submit(c, req, false)
	if err != nil {
		return err
	}
	body := fiber.Map{"task_id": req.TaskID, "queue_position": adm.Position, "workflow_id": task.WorkflowID(req.TaskID),
		"streams": fiber.Map{"sse": "/v2/tasks/" + req.TaskID + "/events"}}
	if adm.PredictedStartMs >= 0 {
		body["predicted_start_ms"] = adm.PredictedStartMs
	} else {
		body["predicted_start_ms"] = nil
	}
	return c.Status(fiber.StatusAccepted).JSON(body)
}

func (r taskRequest) input() (taskInput, error) {
	m := r.ModelRef
	if m == "" {
		m = r.Model
	}
	in := taskInput{id: r.TaskID, session: r.SessionID, model: m, prompt: r.Prompt, messages: r.Messages,
		maxTokens: r.MaxTokens, deadlineMs: r.DeadlineMs, priority: r.Priority, params: task.Params{Stop: r.Stop},
		temperature: r.Temperature, topK: r.TopK, topP: r.TopP, seed: r.Seed}
	if r.Placement != nil {
		in.placement = *r.Placement
		// One spelling each: the top-level fields.
		if in.placement.Engine != "" {
			return in, invalidParam("placement.engine", "set engine at the top level")
		}
		if in.placement.MinCtx != 0 {
			return in, invalidParam("placement.min_ctx", "set ctx at the top level")
		}
		if in.placement.KVHint != "" {
			return in, invalidParam("placement.kv_hint", "set kv_hint at the top level")
		}
	}
	switch r.Workload {
	case "", "completion":
	case "embedding", "rerank":
		return in, invalidParam("workload", "%s is not served yet: no pool runs an embedding or rerank engine", r.Workload)
	default:
		return in, invalidParam("workload", "want completion, embedding or rerank, got %q", r.Workload)
	}
	switch r.Engine {
	case "", task.EngineAny, string(pool.Builtin), string(pool.LlamaServer):
		in.placement.Engine = r.Engine
	default:
		return in, invalidParam("engine", "want %s (any llama.cpp pool), %s or %s, got %q", task.EngineAny, pool.Builtin, pool.LlamaServer, r.Engine)
	}
	if r.Ctx != nil {
		if *r.Ctx < 1 || *r.Ctx > maxCtx {
			return in, invalidParam("ctx", "must be from 1 to %d tokens", maxCtx)
		}
		if r.MaxTokens != nil && *r.MaxTokens > *r.Ctx {
			return in, invalidParam("max_tokens", "%d is above ctx (%d), the slot context the task asks for", *r.MaxTokens, *r.Ctx)
		}
		in.placement.MinCtx = *r.Ctx
	}
	for _, f := range []struct {
		name string
		raw  json.RawMessage
		why  string
	}{
		{"expected_tokens", r.ExpectedTokens, "predicted starts use the nodes' observed service times, not a task's estimate, yet"},
		{"sampler_profile_version", r.SamplerProfileVersion, "sampler profiles are not versioned yet: send the sampling fields"},
		{"inputs", r.Inputs, "inputs belong to embedding and rerank workloads, which are not served yet"},
	} {
		if len(f.raw) > 0 && string(f.raw) != "null" {
			return in, invalidParam(f.name, "is not supported yet: %s", f.why)
		}
	}
	if r.KVHint != nil {
		switch *r.KVHint {
		case task.KVReuse, task.KVCold:
			in.placement.KVHint = *r.KVHint
		default:
			return in, invalidParam("kv_hint", "want %s (the slot holding the prompt's prefix) or %s (load alone, the whole prompt decoded), got %q", task.KVReuse, task.KVCold, *r.KVHint)
		}
	}
	switch r.Determinism {
	case "", "best_effort":
	case "strict": // greedy decoding: the same tokens on any pool, and after a move
		zero := 0.0
		in.temperature = &zero
		// A prompt partly taken from a cache is decoded in other batches,
		// whose rounding can change greedy output: strict decodes it all.
		if in.placement.KVHint == task.KVReuse {
			return in, invalidParam("kv_hint", "reuse cannot go with determinism strict: a cached prefix may change greedy output; send cold or leave it out")
		}
		in.placement.KVHint = task.KVCold
	default:
		return in, invalidParam("determinism", "want strict or best_effort, got %q", r.Determinism)
	}
	return in, nil
}

func taskID(c *fiber.Ctx) (string, error) { return idParam(c, task.ValidateID) }

func (s *Server) getSession(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	sess, err := s.session(c, id)
	if err != nil {
		return err
	}
	return c.JSON(fiber.Map{"session_id": sess.SessionID, "model_id": sess.ModelID, "turns": len(sess.TaskIDs), "max_turns": session.MaxTurns,
		"task_ids": sess.TaskIDs, "created_at": sess.CreatedAt, "last_used": sess.LastUsed, "expires_at": sess.ExpiresAt,
		"ttl_ms": time.Until(sess.ExpiresAt).Milliseconds()})
}

func (s *Server) deleteSession(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	if _, err := s.session(c, id); err != nil {
		return err
	}
	err = s.deps.Sessions.End(c.UserContext(), id)
	if errors.Is(err, control.ErrSessionNotFound) {
		return sessionNotFound(id)
	}
	if err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusNoContent)
}

// session reads a session the caller may see: another key's answers as
// one that does not exist.
func (s *Server) session(c *fiber.Ctx, id string) (session.Info, error) {
	sess, err := s.deps.Sessions.Get(c.UserContext(), id)
	if errors.Is(err, control.ErrSessionNotFound) || err == nil && !owns(c, sess.Owner) {
		return sess, sessionNotFound(id)
	}
	return sess, err
}

func sessionNotFound(id string) error {
	return apiError(fiber.StatusNotFound, CodeSessionNotFound, "session %s does not exist or has expired", id)
}

// status reads a task: its query while it runs, its result once ended.
func (s *Server) status(ctx context.Context, id string) (task.Status, bool, error) {
	st, running, err := s.deps.Tasks.Status(ctx, id)
	if errors.Is(err, control.ErrTaskNotFound) {
		return st, false, taskNotFound(id)
	}
	return st, running, outputError(err)
}

// outputError renders a task's output that cannot be read back from the
// bucket (control.Tasks): gone after the output retention is 410
// OUTPUT_EXPIRED; not matching the checksum its history records is 500
// OUTPUT_CORRUPT, never other text.
func outputError(err error) error {
	var te *task.Error
	if !errors.As(err, &te) {
		return err
	}
	switch te.Code {
	case task.ErrOutputExpired:
		return apiError(fiber.StatusGone, te.Code, "%s", te.Message)
	case task.ErrOutputCorrupt:
		return apiError(fiber.StatusInternalServerError, te.Code, "%s", te.Message)
	}
	return err
}

// ownStatus is status for a caller that may see the task: another key's
// answers as one that does not exist.
func (s *Server) ownStatus(c *fiber.Ctx, id string) (task.Status, bool, error) {
	st, running, err := s.status(c.UserContext(), id)
	if err == nil && !owns(c, st.Owner) {
		return task.Status{}, false, taskNotFound(id)
	}
	return st, running, err
}

func taskNotFound(id string) error {
	return apiError(fiber.StatusNotFound, CodeTaskNotFound, "task %s does not exist", id)
}

func (s *Server) getTask(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	st, _, err := s.ownStatus(c, id)
	if err != nil {
		return err
	}
	st.Pieces = nil
	return c.JSON(st)
}

// cancelTask ends a task. The stream is closed first, so no token reaches
// a client after the 204, then the workflow stops the generation.
func (s *Server) cancelTask(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	if !principalOf(c).IsAdmin() {
		if _, _, err := s.ownStatus(c, id); err != nil {
			return err
		}
	}
	if err := s.cancel(c.UserContext(), id, "by "+identity(c)); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusNoContent)
}

func (s *Server) cancel(ctx context.Context, id, reason string) error {
	st, running, err := s.status(ctx, id)
	var ae *Error
	if errors.As(err, &ae) && (ae.Code == task.ErrOutputExpired || ae.Code == task.ErrOutputCorrupt) {
		err = nil // its text is unreadable, and it has ended all the same
	}
	if err != nil {
		return err
	}
	if st.State == task.Canceled {
		return nil // again: the same answer
	}
	if !running {
		return apiError(fiber.StatusConflict, CodeTaskEnded, "task %s has ended (%s)", id, st.State)
	}
	s.deps.Hub.Stream(id).Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrCanceled, Message: "canceled " + reason}})
	if st.Where != nil && s.follower != nil {
		// Every replica's readers stop at once too: the node ends its
		// stream. Best effort: the workflow's cancel stops the generation.
		if err := s.cancelOnNode(ctx, id, st.Where.NodeID, reason); err != nil {
			s.deps.Logger.Info("cancel: the node's stream was not ended", "task_id", id, "node_id", st.Where.NodeID, "err", err)
		}
	}
	return s.deps.Tasks.Cancel(ctx, id, reason)
}

func (s *Server) cancelOnNode(ctx context.Context, id, nodeID, reason string) error {
	url, err := s.linkURL(ctx, nodeID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return (&link.Client{URL: url, Token: s.deps.LinkToken}).Cancel(ctx, id, "canceled "+reason)
}

// readStream attaches a reader to the task's local stream: fed by the
// follower from the node's link, or (without one) by pushes and finished
// by follow. release detaches the reader.
func (s *Server) readStream(id string) (st *tokenstream.Stream, release func()) {
	if s.follower != nil {
		return s.follower.Read(id)
	}
	st = s.deps.Hub.Stream(id)
	ctx, cancel := context.WithCancel(context.Background())
	go s.follow(ctx, id, st)
	return st, cancel
}

// follow (without a follower) ends a task's stream from its workflow's
// result once it closes:
// the tokens the stream lacks (an apiserver that restarted mid-stream) and
// end, or the error. It returns when the workflow closes or ctx ends.
func (s *Server) follow(ctx context.Context, id string, st *tokenstream.Stream) {
	res, err := s.deps.Tasks.Result(ctx, id)
	if ctx.Err() != nil {
		return
	}
	var te *task.Error
	if errors.As(err, &te) { // its output cannot be read back
		st.Finish(task.Event{Type: "error", Error: te})
		return
	}
	if err != nil {
		st.Finish(task.Event{Type: "error", Error: &task.Error{Code: "INTERNAL", Message: err.Error()}})
		return
	}
	tokenstream.FinishFromStatus(st, res)
}

// taskEvents is the /v2 SSE stream: started, token*, metrics, then end or
// error; `: keep-alive` while idle; resumable with Last-Event-ID (the last
// token index seen). A client that goes away does not cancel the task.
func (s *Server) taskEvents(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	// A stream this apiserver holds is a task it admitted; any other must
	// exist (a describe, not a query: no workflow task round trip).
	if !principalOf(c).IsAdmin() {
		// Whose task it is, its status says (a query; admins skip it).
		if _, _, err := s.ownStatus(c, id); err != nil {
			return err
		}
	} else if s.deps.Hub.Peek(id) == nil {
		err := s.deps.Tasks.Exists(c.UserContext(), id)
		if errors.Is(err, control.ErrTaskNotFound) {
			return taskNotFound(id)
		}
		if err != nil {
			return err
		}
	}
	cur := tokenstream.Cursor{}
	if last := c.Get("Last-Event-ID"); last != "" {
		n, err := strconv.Atoi(last)
		if err != nil || n < -1 || n >= maxCursor {
			return invalidParam("Last-Event-ID", "want the index of the last token received (-1 to %d)", maxCursor-1)
		}
		cur = tokenstream.Cursor{Started: true, Next: n + 1}
	}
	c.Set(fiber.HeaderContentType, "text/event-stream")
	c.Set(fiber.HeaderCacheControl, "no-cache")
	c.Set("X-Accel-Buffering", "no")
	log := s.log(c).With("task_id", id)
	c.Context().SetBodyStreamWriter(s.guardStream(log, func(w *bufio.Writer) {
		stream, release := s.readStream(id)
		defer release()
		_ = s.writeStream(w, stream, cur, func(ev task.Event) []byte { return sseV2(ev) })
		log.Debug("event stream closed")
	}))
	return nil
}

// guardStream wraps a body stream writer: fasthttp runs it on a goroutine
// of its own, where a panic nothing recovers ends the process (and with
// it, under llorch dev, the cluster). log carries the task id.
func (s *Server) guardStream(log *slog.Logger, write func(*bufio.Writer)) func(*bufio.Writer) {
	return func(w *bufio.Writer) {
		defer func() {
			if r := recover(); r != nil {
				s.metrics.streamPanics.Inc()
				log.Error("event stream writer panicked: stream ended", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			}
		}()
		write(w)
	}
}

// writeStream copies a stream's events to w from cur, with keep-alives,
// until the final event or a failed write (the client left).
func (s *Server) writeStream(w *bufio.Writer, st *tokenstream.Stream, cur tokenstream.Cursor, render func(task.Event) []byte) error {
	idle := time.NewTimer(keepAlive) // one per stream, not one per batch
	defer idle.Stop()
	for {
		evs, next, changed := st.Read(cur)
		cur = next
		for _, ev := range evs {
			if b := render(ev); b != nil {
				if _, err := w.Write(b); err != nil {
					return err
				}
			}
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if cur.Done {
			return nil
		}
		idle.Reset(keepAlive)
		select {
		case <-changed:
		case <-s.closing:
			return errShuttingDown
		case <-idle.C:
			if _, err := w.WriteString(": keep-alive\n\n"); err != nil {
				return err
			}
		}
	}
}

// pushEvents receives a node's batch of a task's events: the older path,
// for workers of a rolling upgrade that push to the admitting apiserver.
func (s *Server) pushEvents(c *fiber.Ctx) error {
	id, err := taskID(c)
	if err != nil {
		return err
	}
	tok := strings.TrimPrefix(c.Get(fiber.HeaderAuthorization), "Bearer ")
	if !s.checkSinkToken(id, tok) {
		return apiError(fiber.StatusUnauthorized, CodeBadToken, "stream token not accepted for task %s", id)
	}
	raw, err := readBody(c, maxBodyBytes)
	if err != nil {
		return err
	}
	var body tokenstream.PushBody
	if err := json.Unmarshal(raw, &body); err != nil {
		return invalidParam("body", "%v", err)
	}
	have, err := s.deps.Hub.Stream(id).Push(body.Events)
	if errors.Is(err, tokenstream.ErrGap) {
		return c.Status(fiber.StatusConflict).JSON(tokenstream.PushReply{Have: have})
	}
	for _, ev := range body.Events {
		if ev.Type == "end" {
			s.deps.Scheduler.Finished(id) // the slot is free now
		}
	}
	return c.JSON(tokenstream.PushReply{Have: have})
}

// sinkURL is where nodes push events to this apiserver.
func (s *Server) sinkURL() string {
	if s.cfg.AdvertiseURL != "" {
		return strings.TrimRight(s.cfg.AdvertiseURL, "/")
	}
	scheme := "http://"
	if s.cfg.TLS != nil {
		scheme = "https://"
	}
	if s.ln != nil {
		return scheme + s.ln.Addr().String()
	}
	return scheme + s.cfg.Addr
}

// streamKeyFor derives the key of stream tokens from the API token (so it
// survives a restart), or a random one when there is none.
func streamKeyFor(apiToken string) []byte {
	if apiToken == "" {
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		return b
	}
	sum := sha256.Sum256([]byte("llorch token stream\x00" + apiToken))
	return sum[:]
}

// Bounds of GET /v2/tasks.
const (
	defaultTaskPage = 20
	maxTaskPage     = 100
)

// listTasks is GET /v2/tasks: a page of tasks, newest first, filtered by
// state, model, session and since, the next page's token with it. A key
// that is not admin lists its own tasks only.
func (s *Server) listTasks(c *fiber.Ctx) error {
	var f control.TaskFilter
	for k := range c.Queries() {
		switch k {
		case "state", "model", "session", "since", "page_size", "page_token":
		default:
			return invalidParam(k, "unknown parameter (want state, model, session, since, page_size, page_token)")
		}
	}
	switch st := strings.ToLower(c.Query("state")); st {
	case "":
	case "running", "queued":
		f.State = task.Running // visibility tells a waiting task from a generating one not
	case "completed", "failed", "canceled":
		f.State = task.State(strings.ToUpper(st[:1]) + st[1:])
	default:
		return invalidParam("state", "want running, completed, failed or canceled, got %q", c.Query("state"))
	}
	if m := c.Query("model"); m != "" {
		if err := model.ValidateID(m); err != nil {
			return invalidParam("model", "%v", err)
		}
		f.ModelID = m
	}
	if sess := c.Query("session"); sess != "" {
		if err := task.ValidateID(sess); err != nil {
			return invalidParam("session", "%v", err)
		}
		f.SessionID = sess
	}
	if v := c.Query("since"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			return invalidParam("since", "want an RFC 3339 time, e.g. 2026-12-01T10:00:00Z")
		}
		f.Since = t
	}
	f.PageSize = defaultTaskPage
	if v := c.Query("page_size"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxTaskPage {
			return invalidParam("page_size", "want 1 to %d", maxTaskPage)
		}
		f.PageSize = n
	}
	if v := c.Query("page_token"); v != "" {
		tok, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || len(tok) > 4096 {
			return invalidParam("page_token", "not a token of this list (pass next_page_token as it came)")
		}
		f.PageToken = tok
	}
	if p := principalOf(c); !p.IsAdmin() {
		f.Owner = p.KeyID
	}
	list, next, err := s.deps.Tasks.List(c.UserContext(), f)
	if errors.Is(err, control.ErrNotIndexed) {
		return apiError(fiber.StatusServiceUnavailable, CodeUnavailable, "tasks cannot be listed: %v; register them (see README) and restart the apiserver", err)
	}
	var bad *serviceerror.InvalidArgument
	if errors.As(err, &bad) && f.PageToken != nil {
		return invalidParam("page_token", "not a token of this list: %s", bad.Message)
	}
	if err != nil {
		return err
	}
	var nextTok any
	if len(next) > 0 {
		nextTok = base64.RawURLEncoding.EncodeToString(next)
	}
	return c.JSON(fiber.Map{"tasks": list, "count": len(list), "next_page_token": nextTok})
}
