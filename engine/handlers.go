package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"path/filepath"
	"strconv"

	"github.com/hybridgroup/yzma/pkg/llama"

	"github.com/llorch/llorch/engine/protocol"
)

// Error types as llama-server names them.
const (
	errInvalidRequest = "invalid_request_error"
	errServer         = "server_error"
	errUnavailable    = "unavailable_error"
	errNotFound       = "not_found_error"
)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.handleHealth)
	mux.HandleFunc("GET /v1/health", s.handleHealth)
	mux.HandleFunc("GET /props", s.loaded(s.handleProps))
	mux.HandleFunc("GET /slots", s.loaded(s.handleSlots))
	mux.HandleFunc("GET /metrics", s.loaded(s.handleMetrics))
	mux.HandleFunc("GET /v1/models", s.loaded(s.handleModels))
	mux.HandleFunc("GET /models", s.loaded(s.handleModels))
	mux.HandleFunc("POST /completion", s.loaded(s.noCompletions(s.handleCompletion)))
	mux.HandleFunc("POST /completions", s.loaded(s.noCompletions(s.handleCompletion)))
	mux.HandleFunc("POST /tokenize", s.loaded(s.handleTokenize))
	mux.HandleFunc("POST /apply-template", s.loaded(s.handleApplyTemplate))
	mux.HandleFunc("POST /v1/chat/completions", s.loaded(s.noCompletions(s.handleChat)))
	mux.HandleFunc("POST /chat/completions", s.loaded(s.noCompletions(s.handleChat)))
	mux.HandleFunc("POST /v1/embeddings", s.loaded(s.handleEmbeddings))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, errNotFound, "File Not Found")
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func errorBody(code int, typ, msg string) protocol.ErrorBody {
	return protocol.ErrorBody{Error: protocol.Error{Code: code, Message: msg, Type: typ}}
}

func writeError(w http.ResponseWriter, code int, typ, msg string) {
	writeJSON(w, code, errorBody(code, typ, msg))
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if !s.ready.Load() {
		writeError(w, http.StatusServiceUnavailable, errUnavailable, "Loading model")
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// loaded answers 503 while the model loads, as llama-server does for every
// endpoint but /health.
func (s *Server) loaded(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.ready.Load() {
			writeError(w, http.StatusServiceUnavailable, errUnavailable, "Loading model")
			return
		}
		h(w, r)
	}
}

func (s *Server) modelName() string { return filepath.Base(s.opts.Alias) }

func (s *Server) handleProps(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"default_generation_settings": map[string]any{
			"n_ctx":  s.slotCtx,
			"params": map[string]any{"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": s.opts.Seed},
		},
		"total_slots":   len(s.slots),
		"model_path":    s.opts.ModelPath,
		"model_alias":   s.opts.Alias,
		"chat_template": s.tmpl,
		"modalities":    map[string]bool{"vision": false, "audio": false},
		"build_info":    BuildInfo,
	})
}

func (s *Server) handleSlots(w http.ResponseWriter, r *http.Request) {
	out := make([]map[string]any, 0, len(s.slots))
	for _, sl := range s.slots {
		out = append(out, map[string]any{
			"id":            sl.id,
			"id_task":       sl.taskID.Load(),
			"n_ctx":         sl.nCtx,
			"speculative":   false,
			"is_processing": sl.busy.Load(),
		})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"object": "list",
		"data": []map[string]any{{
			"id": s.modelName(), "object": "model", "created": 0, "owned_by": "llamacpp",
			"meta": map[string]any{"n_ctx_train": s.nCtxTrain},
		}},
	})
}

// handleMetrics writes Prometheus text with llama-server's metric names.
func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	metric := func(name, typ, help string, v float64) {
		fmt.Fprintf(w, "# HELP llamacpp:%s %s\n# TYPE llamacpp:%s %s\nllamacpp:%s %g\n", name, help, name, typ, name, v)
	}
	metric("prompt_tokens_total", "counter", "Number of prompt tokens processed.", float64(s.promptTokens.Load()))
	metric("prompt_seconds_total", "counter", "Prompt process time", float64(s.promptMicros.Load())/1e6)
	metric("tokens_predicted_total", "counter", "Number of generation tokens processed.", float64(s.tokensPredicted.Load()))
	metric("tokens_predicted_seconds_total", "counter", "Predict process time", float64(s.predictedMicros.Load())/1e6)
	metric("requests_processing", "gauge", "Number of requests processing.", float64(s.processing.Load()))
	metric("requests_deferred", "gauge", "Number of requests deferred.", float64(s.deferred.Load()))
}

// completionRequest is llama-server's /completion body, the fields we honour.
type completionRequest struct {
	Prompt       json.RawMessage `json:"prompt"` // a string, or an array of token ids
	NPredict     int             `json:"n_predict"`
	Temperature  float64         `json:"temperature"`
	TopK         int             `json:"top_k"`
	TopP         float64         `json:"top_p"`
	Seed         int64           `json:"seed"`
	Stop         []string        `json:"stop"`
	Stream       bool            `json:"stream"`
	ReturnTokens bool            `json:"return_tokens"`
	// ResumeAt is llorch's: see promptInput.ResumeAt.
	ResumeAt  int             `json:"resume_at"`
	LogitBias json.RawMessage `json:"logit_bias"`
	Grammar   string          `json:"grammar"` // GBNF, as llama-server takes it
	NProbs    int             `json:"n_probs"`
	// CachePrompt and IDSlot are llama-server's, with its defaults: reuse
	// the cache, on the idle slot that shares the longest prefix.
	CachePrompt *bool `json:"cache_prompt"`
	IDSlot      *int  `json:"id_slot"`
}

// parsePrompt reads llama-server's prompt: a string or an array of token ids.
func parsePrompt(raw json.RawMessage) (promptInput, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return promptInput{}, errors.New("\"prompt\" must be provided")
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return promptInput{Text: text}, nil
	}
	var ids []int32
	if err := json.Unmarshal(raw, &ids); err != nil {
		return promptInput{}, errors.New("\"prompt\" must be a string or an array of token ids")
	}
	toks := make([]llama.Token, len(ids))
	for i, id := range ids {
		toks[i] = llama.Token(id)
	}
	return promptInput{Tokens: toks}, nil
}

// parseLogitBias reads llama-server's logit_bias: [[token, bias|false], ...]
// or OpenAI's {"token": bias}; false bans the token.
func parseLogitBias(raw json.RawMessage) ([]llama.LogitBias, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	bias := func(tok int32, v json.RawMessage) (llama.LogitBias, error) {
		var f float64
		if json.Unmarshal(v, &f) == nil {
			if math.IsInf(float64(float32(f)), 0) {
				return llama.LogitBias{}, fmt.Errorf("\"logit_bias\": the bias of token %d is out of range", tok)
			}
			return llama.LogitBias{Token: llama.Token(tok), Bias: float32(f)}, nil
		}
		var b bool
		if json.Unmarshal(v, &b) == nil && !b {
			return llama.LogitBias{Token: llama.Token(tok), Bias: float32(math.Inf(-1))}, nil
		}
		return llama.LogitBias{}, fmt.Errorf("\"logit_bias\": the bias of token %d must be a number or false", tok)
	}
	var out []llama.LogitBias
	var pairs [][]json.RawMessage
	if json.Unmarshal(raw, &pairs) == nil {
		for _, pr := range pairs {
			var tok int32
			if len(pr) != 2 || json.Unmarshal(pr[0], &tok) != nil {
				return nil, errors.New("\"logit_bias\" must be [[token_id, bias], ...] or {\"token_id\": bias}")
			}
			b, err := bias(tok, pr[1])
			if err != nil {
				return nil, err
			}
			out = append(out, b)
		}
		return out, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, errors.New("\"logit_bias\" must be [[token_id, bias], ...] or {\"token_id\": bias}")
	}
	for k, v := range m {
		tok, err := strconv.ParseInt(k, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("\"logit_bias\": key %q is not a token id", k)
		}
		b, err := bias(int32(tok), v)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

func tokenIDs(toks []llama.Token) []int32 {
	ids := make([]int32, len(toks))
	for i, t := range toks {
		ids[i] = int32(t)
	}
	return ids
}

// handleTokenize is llama-server's /tokenize {content, add_special}.
func (s *Server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Content    string `json:"content"`
		AddSpecial bool   `json:"add_special"`
	}
	if !decodeBody(w, r, &req) {
		return
	}
	writeJSON(w, http.StatusOK, protocol.TokenizeResponse{Tokens: tokenIDs(llama.Tokenize(s.vocab, req.Content, req.AddSpecial, true))})
}

// handleApplyTemplate is llama-server's /apply-template {messages}: the
// prompt /v1/chat/completions would generate from.
func (s *Server) handleApplyTemplate(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if !decodeBody(w, r, &req) {
		return
	}
	prompt, err := s.chatPrompt(req)
	if err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, protocol.ApplyTemplateResponse{Prompt: prompt})
}

// decodeBody reads JSON into v. Malformed JSON is a 500, as in llama-server
// (its parser throws); a well-formed body of the wrong shape is a 400.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	if err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, "cannot read the request body: "+err.Error())
		return false
	}
	if !json.Valid(body) {
		writeError(w, http.StatusInternalServerError, errServer, "invalid JSON in the request body")
		return false
	}
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			writeError(w, http.StatusBadRequest, errInvalidRequest, fmt.Sprintf("%q must be a %s, not a JSON %s", te.Field, te.Type, te.Value))
		} else {
			writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		}
		return false
	}
	return true
}

func (s *Server) defaults() sampling {
	return sampling{NPredict: -1, Temperature: 0.8, TopK: 40, TopP: 0.95, Seed: s.opts.Seed}
}

// check validates sampling settings; the message names the field.
func (p *sampling) check() error {
	switch {
	case p.NPredict < -1:
		return fmt.Errorf("\"n_predict\" must be -1 (no limit) or at least 0, not %d", p.NPredict)
	case p.TopP < 0 || p.TopP > 1:
		return fmt.Errorf("\"top_p\" must be between 0 and 1, not %g", p.TopP)
	case p.TopK < 0:
		return fmt.Errorf("\"top_k\" must be at least 0, not %d", p.TopK)
	case p.NProbs < 0 || p.NProbs > MaxProbs:
		return fmt.Errorf("\"n_probs\" must be from 0 to %d, not %d", MaxProbs, p.NProbs)
	case p.Temperature < 0:
		p.Temperature = 0 // llama-server samples greedily for any temperature <= 0
	}
	return nil
}

func timings(o outcome) map[string]any {
	return map[string]any{
		"cache_n":                o.Cached,
		"prompt_n":               o.Evaluated - o.Cached,
		"prompt_ms":              o.PromptMs,
		"prompt_per_second":      perSecond(o.Evaluated-o.Cached, o.PromptMs),
		"predicted_n":            o.Predicted,
		"predicted_ms":           o.PredictedMs,
		"predicted_per_token_ms": o.PredictedMs / float64(max(o.Predicted, 1)),
		"predicted_per_second":   perSecond(o.Predicted, o.PredictedMs),
	}
}

// generationError answers an error from run in the right shape: before the
// stream started as a status, after it as a data: {"error":...} event.
func (s *Server) generationError(w http.ResponseWriter, r *http.Request, err error, streaming bool) {
	if r.Context().Err() != nil {
		return // the client is gone; nobody to tell
	}
	code, typ := http.StatusInternalServerError, errServer
	var re *requestError
	if errors.As(err, &re) {
		code, typ = http.StatusBadRequest, errInvalidRequest
	}
	if streaming {
		_ = writeSSE(w, errorBody(code, typ, err.Error()))
		return
	}
	writeError(w, code, typ, err.Error())
}

func (s *Server) handleCompletion(w http.ResponseWriter, r *http.Request) {
	d := s.defaults()
	req := completionRequest{NPredict: d.NPredict, Temperature: d.Temperature, TopK: d.TopK, TopP: d.TopP, Seed: d.Seed}
	if !decodeBody(w, r, &req) {
		return
	}
	prompt, err := parsePrompt(req.Prompt)
	if err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	prompt.ResumeAt = req.ResumeAt
	prompt.CachePrompt = req.CachePrompt == nil || *req.CachePrompt
	prompt.Slot = -1
	if req.IDSlot != nil {
		if *req.IDSlot < -1 {
			writeError(w, http.StatusBadRequest, errInvalidRequest, fmt.Sprintf("\"id_slot\" must be a slot id or -1 (any), not %d", *req.IDSlot))
			return
		}
		prompt.Slot = *req.IDSlot
	}
	bias, err := parseLogitBias(req.LogitBias)
	if err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	p := sampling{NPredict: req.NPredict, Temperature: req.Temperature, TopK: req.TopK, TopP: req.TopP, Seed: req.Seed, Stop: req.Stop, LogitBias: bias, Grammar: req.Grammar, NProbs: req.NProbs}
	if err := p.check(); err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	final := func(o outcome, content string) map[string]any {
		return map[string]any{
			"content": content, "stop": true, "stop_type": o.StopType, "stopping_word": o.StoppingWord,
			"tokens_predicted": o.Predicted, "tokens_evaluated": o.Evaluated, "tokens_cached": o.Held, "id_slot": o.Slot,
			"truncated": false, "model": s.modelName(), "timings": timings(o),
		}
	}
	if !req.Stream {
		var all []llama.Token
		var allProbs []tokenProbs
		o, err := s.run(r.Context(), prompt, p, func(e emitted) error {
			all, allProbs = append(all, e.Tokens...), append(allProbs, e.Probs...)
			return nil
		})
		if err != nil {
			s.generationError(w, r, err, false)
			return
		}
		body := final(o, o.Content)
		if req.ReturnTokens {
			body["tokens"] = tokenIDs(all)
		}
		if p.NProbs > 0 {
			body["completion_probabilities"] = s.probsJSON(all, allProbs)
		}
		writeJSON(w, http.StatusOK, body)
		return
	}
	// Headers go out with the first event, so an error found before it (a
	// prompt over the context) is still a plain 400, as in llama-server.
	started := false
	start := func() {
		if !started {
			started = true
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			w.WriteHeader(http.StatusOK)
		}
	}
	out := newTokenWriter(w)
	defer out.stop() // also on a panic: no flush may follow the handler
	o, err := s.run(r.Context(), prompt, p, func(e emitted) error {
		if e.Text == "" && !req.ReturnTokens && len(e.Probs) == 0 {
			return nil
		}
		start()
		// As llama-server's partial events: the prompt's length with each.
		ev := map[string]any{"content": e.Text, "stop": false, "tokens_evaluated": e.Evaluated}
		if req.ReturnTokens {
			ev["tokens"] = tokenIDs(e.Tokens)
		}
		if len(e.Probs) > 0 {
			ev["completion_probabilities"] = s.probsJSON(e.Tokens, e.Probs)
		}
		return out.event(ev)
	})
	out.stop()
	if err != nil {
		s.generationError(w, r, err, started)
		return
	}
	start()
	_ = writeSSE(w, final(o, ""))
}

// chatRequest is the OpenAI chat body, the fields we honour.
type chatRequest struct {
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
	MaxTokens     *int     `json:"max_tokens"`
	MaxCompTokens *int     `json:"max_completion_tokens"`
	NPredict      *int     `json:"n_predict"`
	Temperature   *float64 `json:"temperature"`
	TopK          *int     `json:"top_k"`
	TopP          *float64 `json:"top_p"`
	Seed          *int64   `json:"seed"`
	Stop          stopList `json:"stop"`
	Stream        bool     `json:"stream"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// chatPrompt renders a chat request's messages with the model's template.
func (s *Server) chatPrompt(req chatRequest) (string, error) {
	msgs := make([]chatMessage, 0, len(req.Messages))
	for _, m := range req.Messages {
		msgs = append(msgs, chatMessage{Role: m.Role, Content: m.Content})
	}
	return applyTemplate(s.tmpl, msgs)
}

// stopList accepts OpenAI's string or array of strings.
type stopList []string

func (l *stopList) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*l = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return errors.New("\"stop\" must be a string or an array of strings")
	}
	*l = many
	return nil
}

func finishReason(stopType string) string {
	if stopType == StopLimit {
		return "length"
	}
	return "stop"
}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if len(req.Messages) == 0 {
		writeError(w, http.StatusBadRequest, errInvalidRequest, "\"messages\" must be a non-empty array")
		return
	}
	p := s.defaults()
	for _, n := range []*int{req.NPredict, req.MaxTokens, req.MaxCompTokens} {
		if n != nil {
			p.NPredict = *n
		}
	}
	if req.Temperature != nil {
		p.Temperature = *req.Temperature
	}
	if req.TopK != nil {
		p.TopK = *req.TopK
	}
	if req.TopP != nil {
		p.TopP = *req.TopP
	}
	if req.Seed != nil {
		p.Seed = *req.Seed
	}
	p.Stop = req.Stop
	if err := p.check(); err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	prompt, err := s.chatPrompt(req)
	if err != nil {
		writeError(w, http.StatusInternalServerError, errServer, err.Error())
		return
	}
	id := fmt.Sprintf("chatcmpl-%d", s.nextTask.Load()+1)
	created := nowUnix()
	model := s.modelName()
	usage := func(o outcome) map[string]any {
		return map[string]any{"prompt_tokens": o.Evaluated, "completion_tokens": o.Predicted, "total_tokens": o.Evaluated + o.Predicted}
	}
	if !req.Stream {
		o, err := s.run(r.Context(), promptInput{Text: prompt, CachePrompt: true, Slot: -1}, p, func(emitted) error { return nil })
		if err != nil {
			s.generationError(w, r, err, false)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "object": "chat.completion", "created": created, "model": model,
			"choices": []map[string]any{{
				"index": 0, "finish_reason": finishReason(o.StopType),
				"message": map[string]any{"role": "assistant", "content": o.Content},
			}},
			"usage": usage(o), "timings": timings(o),
		})
		return
	}
	chunk := func(delta map[string]any, finish any) map[string]any {
		return map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
			"choices": []map[string]any{{"index": 0, "delta": delta, "finish_reason": finish}},
		}
	}
	started := false
	start := func() error {
		if started {
			return nil
		}
		started = true
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.WriteHeader(http.StatusOK)
		return writeSSE(w, chunk(map[string]any{"role": "assistant", "content": nil}, nil))
	}
	o, err := s.run(r.Context(), promptInput{Text: prompt, CachePrompt: true, Slot: -1}, p, func(e emitted) error {
		if e.Text == "" {
			return nil
		}
		if err := start(); err != nil {
			return err
		}
		return writeSSE(w, chunk(map[string]any{"content": e.Text}, nil))
	})
	if err != nil {
		s.generationError(w, r, err, started)
		return
	}
	_ = start()
	last := chunk(map[string]any{}, finishReason(o.StopType))
	last["timings"] = timings(o)
	_ = writeSSE(w, last)
	if req.StreamOptions.IncludeUsage {
		u := chunk(nil, nil)
		u["choices"] = []any{}
		u["usage"] = usage(o)
		_ = writeSSE(w, u)
	}
	_, _ = io.WriteString(w, "data: [DONE]\n\n")
	_ = http.NewResponseController(w).Flush()
}
