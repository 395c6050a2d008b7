package activities

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/engine/protocol"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// GenerateActivities run generations on the node, next to its engines.
type GenerateActivities struct {
	NodeID  string
	Log     *slog.Logger
	Metrics *TaskMetrics
	// Client talks to the engines; nil: engineHTTP. (Token pushes to a
	// sink use the pusher's own client.)
	Client *http.Client
	// Running is the node's slot authority: each generation claims a slot
	// of its engine there, waiting in the engine's queue (the counts the
	// node link reports); nil: not counted.
	Running *Generations
	// Streams holds each task's events on this node, as the node link
	// serves them to apiserver replicas; nil: none kept (tests).
	Streams *tokenstream.Hub
	// Outputs stores an output above MaxInlineOutput in the bucket, and
	// the result holds its reference (Temporal refuses a payload over 2
	// MiB); nil: every output inline.
	Outputs OutputWriter
	// MaxInlineOutput is the largest output (tokens and pieces as JSON)
	// returned inline; 0: outputs.DefaultMaxInline. It bounds the tokens a
	// WORKER_RESET carries too.
	MaxInlineOutput int
	// ClaimWithin bounds how long a generation started ahead of its
	// workflow (StartEarly) runs unclaimed; 0: node.LinkFastStartClaim.
	ClaimWithin time.Duration

	runs runs // the node's generations by task (faststart.go)
}

// OutputWriter stores a generation's output (outputs.Store).
type OutputWriter interface {
	Write(ctx context.Context, key string, out task.Output) (task.OutputRef, error)
}

// GenerateInput is one generation of a task on one pool; Resume holds the
// tokens an earlier generation of the task produced (on a lost node).
type GenerateInput struct {
	Request task.Request
	Where   task.Where
	Resume  task.Progress
	// Attach: the admitting replica sent this generation to the node ahead
	// of the workflow (Request.FastStart): the activity takes over the one
	// running (or ended) there rather than start another.
	Attach bool
}

// firstBeat is when a generation first heartbeats: most end before it and
// cost Temporal no heartbeat at all; after it the SDK sends at most one per
// 0.8 of the heartbeat timeout (the task workflow's is 5 s).
const firstBeat = 2 * time.Second

// Generate streams a completion from the pool's engine, or (in.Attach)
// supervises the one the node link started ahead of the workflow. Each
// token goes to the task's node stream out of band; the heartbeat carries
// only the count (the tokens of a lost node come back from what readers
// saw, task.SignalSeen); the result is the whole generation.
func (g *GenerateActivities) Generate(ctx context.Context, in GenerateInput) (task.Result, error) {
	r, attached, resumeFrom := g.runs.claim(in)
	stop := heartbeats(ctx, r)
	defer stop()
	if attached {
		g.Metrics.fastStart(g.NodeID, "claimed")
		return g.supervise(ctx, r)
	}
	defer g.runs.end(r)
	defer close(r.done)
	if resumeFrom != nil {
		// Started ahead and cancelled before this activity came: go on
		// from its tokens, in its node stream (left open for this).
		<-resumeFrom.done
		if p := resumeFrom.progress(); len(p.Tokens) > len(r.in.Resume.Tokens) {
			r.in.Resume = p
		}
		r.reuseStream = true
		g.log().Info("generation started ahead was cancelled unclaimed: resuming from its tokens",
			"task_id", in.Request.TaskID, "pool_id", in.Where.PoolID, "tokens", len(r.in.Resume.Tokens))
	}
	info := activity.GetInfo(ctx)
	r.res, r.err = g.generate(ctx, r, outputs.Key(in.Request.TaskID, info.ActivityID, info.Attempt))
	return r.res, r.err
}

// supervise waits for a generation started ahead, heartbeating; the
// activity's cancel stops it.
func (g *GenerateActivities) supervise(ctx context.Context, r *run) (task.Result, error) {
	defer g.runs.end(r)
	select {
	case <-r.done:
	case <-ctx.Done():
		r.cancel(context.Canceled)
		<-r.done
		return task.Result{}, ctx.Err()
	}
	return r.res, r.err
}

// heartbeats records r's progress count until stop.
func heartbeats(ctx context.Context, r *run) (stop func()) {
	hbCtx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTimer(firstBeat)
		defer t.Stop()
		for {
			select {
			case <-hbCtx.Done():
				return
			case <-t.C:
				activity.RecordHeartbeat(ctx, r.beat())
				t.Reset(time.Second)
			}
		}
	}()
	return cancel
}

// generate runs r's generation on ctx: a slot of its engine, then the
// completion, each event into the node stream. Its tokens are r.prog as
// they come; an output above the inline bound goes to the bucket at key.
func (g *GenerateActivities) generate(ctx context.Context, r *run, key string) (_ task.Result, err error) {
	in := r.in
	req := in.Request
	log := g.log().With("task_id", req.TaskID, "pool", in.Where.PoolID, "correlation_id", req.CorrelationID)
	push := g.openSink(in, r.reuseStream)
	defer func() { push.close(ctx, err, log) }()
	r.mu.Lock()
	r.prog = task.Progress{Tokens: append([]int32(nil), in.Resume.Tokens...), Pieces: append([]string(nil), in.Resume.Pieces...),
		TokensIn: in.Resume.TokensIn}
	r.mu.Unlock()
	resumed := len(in.Resume.Tokens)
	push.Send(task.Event{Type: "started", NodeID: in.Where.NodeID, PoolID: in.Where.PoolID})
	if resumed > 0 {
		push.Send(task.Event{Type: "metrics", Metrics: map[string]any{
			"resumed_at_token": resumed, "node_id": in.Where.NodeID, "pool_id": in.Where.PoolID}})
		push.resumed(in.Resume)
	}
	// A generation that broke off with its worker alive (its engine died)
	// hands the workflow its tokens in the error: the move resumes from
	// all of them, not from the last heartbeat's.
	defer func() {
		var app *temporal.ApplicationError
		if errors.As(err, &app) && app.Type() == task.ErrWorkerReset && !app.HasDetails() {
			err = temporal.NewApplicationErrorWithCause(app.Message(), task.ErrWorkerReset, app.Unwrap(), resetProgress(r.progress(), g.maxInline()))
		}
	}()
	release, waited, err := g.Running.Claim(ctx, ClaimRequest{PoolID: in.Where.PoolID, URL: in.Where.URL, Epoch: in.Where.Epoch,
		TaskID: req.TaskID, Priority: req.Priority, EnqueuedAt: req.EnqueuedAt, OnPosition: func(n int) {
			push.Send(task.Event{Type: "metrics", Metrics: map[string]any{"waiting": true, "queue_position": n, "pool_id": in.Where.PoolID}})
		}})
	if err != nil {
		return task.Result{}, g.claimErr(ctx, in, err)
	}
	defer release()
	// The slot whose cache holds the longest prefix of the prompt (package
	// prefix); a resumed generation decodes its whole prompt again, as the
	// first did, and a cold one asked to.
	reuse := req.Placement.KVHint != task.KVCold && resumed == 0
	chain := prefix.Hashes(prefix.Of(req))
	slot := g.Running.TakeSlot(in.Where.PoolID, in.Where.URL, chain, reuse)
	var held []uint64 // what the slot's cache holds at the end (nil: unknown)
	defer func() { g.Running.PutSlot(in.Where.PoolID, in.Where.URL, slot, held) }()

	hc := g.Client
	if hc == nil {
		hc = engineHTTP
	}
	eng := protocol.Client{URL: in.Where.URL, HTTP: hc}
	res := task.Result{WaitMs: waited.Milliseconds()}
	nPredict := req.Params.MaxTokens - resumed
	// A fresh generation sends its prompt as text and learns its length
	// from the engine's first event: no tokenize round trip before the
	// first token. A resumed one sends the prompt's token ids and the
	// produced ones, so it continues exactly where it broke off.
	var prompt protocol.Prompt
	if resumed > 0 || nPredict <= 0 {
		toks, err := g.promptTokens(ctx, eng, in)
		if err != nil {
			return task.Result{}, err
		}
		res.TokensIn = len(toks)
		r.promptLen(res.TokensIn)
		prompt = protocol.Prompt{Tokens: append(toks, in.Resume.Tokens...)}
	} else {
		text, err := g.promptText(ctx, eng, in)
		if err != nil {
			return task.Result{}, err
		}
		prompt = protocol.Prompt{Text: text}
	}
	if nPredict <= 0 {
		p := r.progress()
		res.Tokens, res.Pieces, res.StopType = p.Tokens, p.Pieces, "limit"
		if res, err = g.offload(ctx, req.TaskID, key, res, log); err != nil {
			return task.Result{}, err
		}
		push.Send(task.Event{Type: "end", TokensOut: len(p.Tokens), TokensIn: res.TokensIn, StopType: res.StopType})
		return res, nil
	}
	body := protocol.CompletionRequest{
		Prompt: prompt, NPredict: nPredict,
		Temperature: req.Params.Temperature, TopK: req.Params.TopK, TopP: req.Params.TopP,
		Seed: req.Params.Seed, Stop: req.Params.Stop, Stream: true, ReturnTokens: true, Grammar: req.Params.Grammar,
		CachePrompt: reuse,
	}
	if slot >= 0 {
		body.IDSlot = &slot
	}
	if req.Params.Logprobs {
		body.NProbs = max(1, req.Params.TopLogprobs) // 0 asks for none at all
	}
	if resumed > 0 {
		// The built-in engine decodes the produced tokens one by one, as
		// they were generated: greedy output then continues exactly.
		// llama-server ignores the field.
		body.ResumeAt = res.TokensIn
	}
	start := time.Now()
	stream, err := eng.Complete(ctx, body)
	var status *protocol.StatusError
	if errors.As(err, &status) {
		return task.Result{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("engine %s answered %d: %s", in.Where.URL, status.Code, status.Body), task.ErrEngine, nil)
	}
	if err != nil {
		return task.Result{}, g.engineErr(ctx, in, err)
	}
	defer stream.Close()
	first := true
	for {
		ch, err := stream.Next()
		var bad *protocol.EventError
		if errors.As(err, &bad) {
			return task.Result{}, fmt.Errorf("engine %s: bad stream event: %w", in.Where.URL, bad.Err)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return task.Result{}, g.engineErr(ctx, in, err)
		}
		if ch.Error != nil {
			return task.Result{}, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("engine %s: %s", in.Where.URL, ch.Error.Message), task.ErrEngine, nil)
		}
		if prompt.Tokens == nil && res.TokensIn == 0 && ch.TokensEvaluated > 0 {
			// Both engines say it with the first event.
			res.TokensIn = ch.TokensEvaluated
			r.promptLen(res.TokensIn)
		}
		if len(ch.Tokens) > 0 && first {
			res.FirstTokenMs = time.Since(start).Milliseconds()
			g.Metrics.firstToken(g.NodeID, time.Since(start))
			first = false
			held = chain // the prompt is in the cache now
		}
		r.mu.Lock()
		for j, tok := range ch.Tokens {
			piece := ""
			if j == len(ch.Tokens)-1 {
				piece = ch.Content
			}
			i := len(r.prog.Tokens)
			r.prog.Tokens = append(r.prog.Tokens, tok)
			r.prog.Pieces = append(r.prog.Pieces, piece)
			ev := task.Event{Type: "token", I: i, T: piece, Tok: tok}
			if req.Params.Logprobs && j < len(ch.Probs) {
				ev.LP = logprobOf(ch.Probs[j], req.Params.TopLogprobs)
			}
			push.Send(ev)
		}
		r.mu.Unlock()
		if ch.Stop {
			res.StopType = ch.StopType
			res.DecodeMs = int64(ch.Timings.PredictedMs)
			res.TokensCached = ch.Timings.CacheN
			break
		}
	}
	if res.StopType == "" {
		return task.Result{}, g.engineErr(ctx, in, io.ErrUnexpectedEOF)
	}
	p := r.progress()
	res.Tokens, res.Pieces = p.Tokens, p.Pieces
	produced := len(res.Tokens)
	held = prefix.Hashes(prefix.After(req, strings.Join(res.Pieces, "")))
	g.Metrics.generated(g.NodeID, res.TokensIn, produced-resumed, time.Duration(res.DecodeMs)*time.Millisecond)
	g.Metrics.cached(g.NodeID, res.TokensCached)
	// Stored before the end event: a reader that sees the end may read
	// the task's result at once.
	if res, err = g.offload(ctx, req.TaskID, key, res, log); err != nil {
		return task.Result{}, err
	}
	push.Send(task.Event{Type: "end", TokensOut: produced, DecodeTimeMs: res.DecodeMs, TokensIn: res.TokensIn, TokensCached: res.TokensCached, StopType: res.StopType})
	log.Info("generation done", "tokens_in", res.TokensIn, "tokens_cached", res.TokensCached, "slot", slot, "tokens_out", produced, "resumed", resumed,
		"first_token_ms", res.FirstTokenMs, "decode_ms", res.DecodeMs, "fast_start", r.ahead)
	return res, nil
}

// logprobOf is the engine's probabilities of a token as an event carries
// them, with at most top alternatives.
func logprobOf(p protocol.TokenProb, top int) *task.Logprob {
	lp := &task.Logprob{T: p.Token, B: p.Bytes, P: p.Logprob}
	for _, t := range p.Top[:min(top, len(p.Top))] {
		lp.Top = append(lp.Top, task.TopLogprob{Tok: t.ID, T: t.Token, B: t.Bytes, P: t.Logprob})
	}
	return lp
}

// resetProgress is what a WORKER_RESET carries: every token, unless they
// are above the inline bound (a payload past Temporal's limit would lose
// the error itself); then the count alone, and the move resumes from what
// readers saw (task.SignalSeen).
func resetProgress(p task.Progress, bound int) task.Progress {
	if outputs.Size(task.Output{Tokens: p.Tokens, Pieces: p.Pieces}) > bound {
		return task.Progress{Produced: len(p.Tokens), TokensIn: p.TokensIn}
	}
	return p
}

func (g *GenerateActivities) maxInline() int {
	if g.MaxInlineOutput > 0 {
		return g.MaxInlineOutput
	}
	return outputs.DefaultMaxInline
}

// offload writes an output above the inline bound to the bucket and
// returns the result with its reference instead of its tokens. A write
// that keeps failing fails the generation (OUTPUT_UNSTORED): inline, the
// result would be refused by Temporal anyway.
func (g *GenerateActivities) offload(ctx context.Context, taskID, key string, res task.Result, log *slog.Logger) (task.Result, error) {
	out := task.Output{Tokens: res.Tokens, Pieces: res.Pieces}
	size := outputs.Size(out)
	if g.Outputs == nil || size <= g.maxInline() {
		return res, nil
	}
	var err error
	for try, wait := 1, 250*time.Millisecond; ; try, wait = try+1, 2*wait {
		var ref task.OutputRef
		if ref, err = g.Outputs.Write(ctx, key, out); err == nil {
			log.Info("output stored in the bucket", "key", key, "bytes", ref.Bytes, "encoded_bytes", size, "tokens", len(res.Tokens))
			g.Metrics.offloaded(g.NodeID)
			res.Tokens, res.Pieces, res.Output = nil, nil, &ref
			return res, nil
		}
		if try == 4 || ctx.Err() != nil {
			break
		}
		log.Warn("output not stored yet; trying again", "key", key, "try", try, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return res, temporal.NewNonRetryableApplicationError(fmt.Sprintf("node %s: task %s: its output (%d tokens, %d bytes) is above the inline bound (%d) and the bucket did not take it: %v",
		g.NodeID, taskID, len(res.Tokens), size, g.maxInline(), err), task.ErrOutputUnstored, nil)
}

// eventSink takes a generation's events: into the node's stream of the
// task (the node link serves it to every replica) and, for a task an older
// apiserver admitted (Sink.URL set, a rolling upgrade), pushed there too.
type eventSink struct {
	taskID string
	st     *tokenstream.Stream // nil: the node keeps no streams
	detach func()              // the generation holds its stream while it runs
	push   *tokenstream.Pusher // nil: no legacy sink
}

func (g *GenerateActivities) openSink(in GenerateInput, reuse bool) *eventSink {
	e := &eventSink{taskID: in.Request.TaskID}
	var held *tokenstream.Stream
	if g.Streams != nil && reuse {
		held = g.Streams.Peek(in.Request.TaskID)
	}
	if held != nil && !held.Ended() && held.Tokens() == len(in.Resume.Tokens) {
		// The stream of a generation cancelled unclaimed, which this one
		// continues: its readers go on with no gap.
		e.st, e.detach = held, held.Attach()
	} else if g.Streams != nil {
		// A moved task's stream holds the resumed tokens too (resumed
		// seeds them), so a replica that saw fewer than the resume point
		// gets the rest with no gap. Without their pieces it starts at the
		// resume index: the tokens below are not held here.
		base := 0
		if len(in.Resume.Pieces) != len(in.Resume.Tokens) {
			base = len(in.Resume.Tokens)
		}
		e.st = g.Streams.Open(in.Request.TaskID, base)
		// A generation waiting long at the node for a slot, with no
		// subscriber, must not have its stream dropped as abandoned.
		e.detach = e.st.Attach()
	}
	if in.Request.Sink.URL != "" {
		e.push = tokenstream.NewPusher(in.Request.Sink, in.Request.TaskID, nil)
	}
	return e
}

// Send takes events in order.
func (e *eventSink) Send(evs ...task.Event) {
	if e.st != nil {
		_, _ = e.st.Push(evs) // the generation's own order: no gap
	}
	if e.push != nil {
		e.push.Send(evs...)
	}
}

// resumed seeds the node stream with the tokens an earlier generation
// produced (the legacy sink has them).
func (e *eventSink) resumed(p task.Progress) {
	if e.st == nil || e.st.Base() > 0 {
		return
	}
	evs := make([]task.Event, len(p.Tokens))
	for i, tok := range p.Tokens {
		evs[i] = task.Event{Type: "token", I: i, T: p.Pieces[i], Tok: tok}
	}
	_, _ = e.st.Push(evs)
}

// close ends the node stream with the error the generation failed with
// (a canceled one with CANCELED), and flushes the legacy sink.
func (e *eventSink) close(ctx context.Context, err error, log *slog.Logger) {
	// A generation cancelled unclaimed leaves its stream open: the
	// activity that comes later continues it.
	if e.st != nil && err != nil && !errors.Is(context.Cause(ctx), errUnclaimed) {
		e.st.Finish(task.Event{Type: "error", Error: generationError(ctx, err)})
	}
	if e.detach != nil {
		e.detach()
	}
	if e.push != nil {
		if perr := e.push.Close(5 * time.Second); perr != nil {
			log.Warn("token stream: events not delivered", "err", perr)
		}
	}
}

// generationError is a failed generation as the workflow records it
// (workflows/task.go asTaskError): a canceled one is CANCELED (the
// workflow's own record says why: a cancel or a deadline).
func generationError(ctx context.Context, err error) *task.Error {
	if ctx.Err() != nil || errors.Is(err, context.Canceled) {
		return &task.Error{Code: task.ErrCanceled, Message: "generation canceled"}
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		retriable := app.Type() == task.ErrPoolUnavailable || app.Type() == task.ErrWorkerReset
		e := &task.Error{Code: app.Type(), Message: app.Message(), Retriable: retriable}
		if retriable {
			e.RetryAfterMs = 1000
		}
		return e
	}
	return &task.Error{Code: task.ErrEngine, Message: err.Error()}
}

// promptText is the request's prompt, or the prompt the engine's chat
// template renders from its messages.
func (g *GenerateActivities) promptText(ctx context.Context, eng protocol.Client, in GenerateInput) (string, error) {
	if len(in.Request.Messages) == 0 {
		return in.Request.Prompt, nil
	}
	msgs := make([]protocol.Message, len(in.Request.Messages))
	for i, m := range in.Request.Messages {
		msgs[i] = protocol.Message(m)
	}
	prompt, err := eng.ApplyTemplate(ctx, msgs)
	if err != nil {
		return "", g.engineErr(ctx, in, err)
	}
	return prompt, nil
}

// promptTokens tokenizes the prompt on the engine, as its /completion
// does a text prompt, so a resumed generation sends exactly the token ids
// the first one read.
func (g *GenerateActivities) promptTokens(ctx context.Context, eng protocol.Client, in GenerateInput) ([]int32, error) {
	prompt, err := g.promptText(ctx, eng, in)
	if err != nil {
		return nil, err
	}
	toks, err := eng.Tokenize(ctx, protocol.TokenizeRequest{Content: prompt, AddSpecial: true})
	if err != nil {
		return nil, g.engineErr(ctx, in, err)
	}
	return toks, nil
}

// claimErr: a refused claim is retriable elsewhere (the workflow places
// the task again); a canceled task stays canceled.
func (g *GenerateActivities) claimErr(ctx context.Context, in GenerateInput, err error) error {
	if ctx.Err() != nil || !errors.Is(err, ErrSlotRefused) {
		return err
	}
	return temporal.NewApplicationError(fmt.Sprintf("task %s: %v", in.Request.TaskID, err), task.ErrSlotRefused)
}

// engineErr: a canceled task stays canceled; an engine that cannot be
// reached or broke off is retriable elsewhere (the workflow decides).
func (g *GenerateActivities) engineErr(ctx context.Context, in GenerateInput, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return err
	}
	return temporal.NewApplicationError(fmt.Sprintf("node %s: engine of pool %s: %v", g.NodeID, in.Where.PoolID, err), task.ErrWorkerReset)
}

func (g *GenerateActivities) log() *slog.Logger {
	if g.Log == nil {
		return slog.Default()
	}
	return g.Log.With("node_id", g.NodeID)
}

// engineHTTP reaches engines when GenerateActivities names no client. It
// keeps up to 64 idle connections per engine (Go's default keeps 2): a
// burst of generations would otherwise dial and accept a new connection
// per request while the engine is busiest.
var engineHTTP = &http.Client{Transport: &http.Transport{
	Proxy: http.ProxyFromEnvironment, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second,
}}
