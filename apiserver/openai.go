package apiserver

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// openAIError renders any error as {"error":{message,type,param,code}}.
func (s *Server) openAIError(c *fiber.Ctx, err error) error {
	status, typ, code, param, msg := fiber.StatusInternalServerError, "server_error", "", "", err.Error()
	var e *Error
	var fe *fiber.Error
	switch {
	case errors.As(err, &e):
		status, msg, param = e.Status, e.Message, e.Field
		code = strings.ToLower(e.Code)
		switch {
		case e.Code == CodeModelNotFound:
			typ = "invalid_request_error"
		case e.Code == CodeMissingToken || e.Code == CodeBadToken:
			typ, code = "invalid_request_error", "invalid_api_key"
		case e.Code == CodeAdmission:
			typ, code = "requests", "rate_limit_exceeded"
		case e.Code == CodeQuotaExceeded:
			// OpenAI's shape of a key's rate limit; the message names
			// which limit and the key.
			typ, code = "requests", "rate_limit_exceeded"
		case status < 500:
			typ = "invalid_request_error"
		}
		if e.Code == CodeInvalidParams {
			code = ""
		}
	case errors.As(err, &fe):
		status, msg = fe.Code, fe.Message
		if status < 500 {
			typ = "invalid_request_error"
		}
	}
	body := fiber.Map{"message": msg, "type": typ, "param": nil, "code": nil}
	if param != "" {
		body["param"] = param
	}
	if code != "" {
		body["code"] = code
	}
	if status >= 500 {
		s.log(c).Error("request failed", "err", err)
	}
	return c.Status(status).JSON(fiber.Map{"error": body})
}

// openAIMessage takes content as a string or an array of text parts.
type openAIMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

func (m openAIMessage) text(i int) (string, error) {
	var s string
	if json.Unmarshal(m.Content, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(m.Content, &parts); err != nil {
		return "", invalidParam(fmt.Sprintf("messages[%d].content", i), "want a string or an array of text parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", invalidParam(fmt.Sprintf("messages[%d].content", i), "only text parts are supported, got %q", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// stopField takes OpenAI's string or array of strings.
type stopField []string

func (l *stopField) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		*l = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return &json.UnmarshalTypeError{Value: "value", Field: "stop", Type: nil}
	}
	*l = many
	return nil
}

// maxEndUser bounds a request's user, an end user's id for the audit trail.
const maxEndUser = 256

type openAIRequest struct {
	Model               string          `json:"model"`
	Messages            []openAIMessage `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"` // llama.cpp's, beside OpenAI's
	User                string          `json:"user"`
	ResponseFormat      json.RawMessage `json:"response_format"` // chat
	Logprobs            json.RawMessage `json:"logprobs"`        // chat: a boolean; completions: a count
	TopLogprobs         *int            `json:"top_logprobs"`    // chat
	Seed                *int64          `json:"seed"`
	Stop                stopField       `json:"stop"`
	N                   *int            `json:"n"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// input maps an OpenAI request onto a task; field names the max-tokens
// field the client used.
func (r openAIRequest) input(chat bool) (in taskInput, field string, err error) {
	if r.Model == "" {
		return in, "", invalidParam("model", "is required")
	}
	if r.N != nil && *r.N != 1 {
		return in, "", invalidParam("n", "only n=1 is supported")
	}
	in = taskInput{model: r.Model, maxTokens: r.MaxTokens, temperature: r.Temperature, topP: r.TopP, seed: r.Seed,
		params: task.Params{Stop: r.Stop}}
	if chat {
		if in.params.Grammar, err = responseFormat(r.ResponseFormat); err != nil {
			return in, "", err
		}
	}
	if in.params.Logprobs, in.params.TopLogprobs, err = logprobsParams(chat, r.Logprobs, r.TopLogprobs); err != nil {
		return in, "", err
	}
	if r.MaxCompletionTokens != nil {
		in.maxTokens = r.MaxCompletionTokens
	}
	if chat {
		if len(r.Messages) == 0 {
			return in, "", invalidParam("messages", "a non-empty array is required")
		}
		for i, m := range r.Messages {
			role, ok := openAIRole(m.Role)
			if !ok {
				return in, "", invalidParam(fmt.Sprintf("messages[%d].role", i), "want system, developer, user or assistant, got %q", m.Role)
			}
			text, err := m.text(i)
			if err != nil {
				return in, "", err
			}
			in.messages = append(in.messages, task.Message{Role: role, Content: text})
		}
	} else {
		var p string
		if err := json.Unmarshal(r.Prompt, &p); err != nil {
			return in, "", invalidParam("prompt", "want a string")
		}
		in.prompt = &p
	}
	// OpenAI's defaults: temperature 1, top_p 1, no top-k.
	one, zeroK := 1.0, 0
	if in.temperature == nil {
		in.temperature = &one
	}
	if in.topP == nil {
		in.topP = &one
	}
	in.topK = r.TopK
	if in.topK == nil {
		in.topK = &zeroK
	}
	field = "max_tokens"
	if r.MaxCompletionTokens != nil {
		field = "max_completion_tokens"
	}
	return in, field, nil
}

func (s *Server) openAITask(c *fiber.Ctx, chat bool) (task.Request, openAIRequest, scheduler.Admission, error) {
	var r openAIRequest
	var adm scheduler.Admission
	endpoint := "completions"
	if chat {
		endpoint = "chat.completions"
	}
	if err := s.openAIBody(c, endpoint, &r, func(body []byte) error { return checkOpenAIFields(body, chat) }); err != nil {
		return task.Request{}, r, adm, err
	}
	if err := endUser(c, r.User); err != nil {
		return task.Request{}, r, adm, err
	}
	in, field, err := r.input(chat)
	if err != nil {
		return task.Request{}, r, adm, err
	}
	req, _, err := s.buildTask(c, in, field)
	if err != nil {
		return req, r, adm, modelNotFound(err, r.Model)
	}
	// A stream's first token need not wait for the workflow's start: a
	// client that leaves cancels the task (after its start, see below).
	if adm, err = s.submit(c, req, r.Stream); err != nil {
		return req, r, adm, err
	}
	return req, r, adm, nil
}

// openAIBody reads a /v1 body into dst and checks its fields with check;
// a refusal is counted under endpoint.
func (s *Server) openAIBody(c *fiber.Ctx, endpoint string, dst any, check func([]byte) error) error {
	raw, err := readBody(c, maxBodyBytes)
	if err != nil {
		return err
	}
	body := bytes.TrimSpace(raw)
	if err := decodeLooseBytes(body, dst); err != nil {
		return err
	}
	if err := check(body); err != nil {
		s.metrics.openAIRefused.WithLabelValues(endpoint, refusedParam(err)).Inc()
		return err
	}
	return nil
}

// endUser keeps a request's user (bounded) for the audit trail.
func endUser(c *fiber.Ctx, user string) error {
	if len(user) > maxEndUser {
		return invalidParam("user", "at most %d bytes", maxEndUser)
	}
	if user != "" {
		c.Locals(localEndUser, user)
	}
	return nil
}

// modelNotFound is a catalog miss in OpenAI's words (model_not_found).
func modelNotFound(err error, model string) error {
	var e *Error
	if errors.As(err, &e) && e.Code == CodeModelNotFound {
		e.Code, e.Message = "MODEL_NOT_FOUND", fmt.Sprintf("The model `%s` does not exist", model)
	}
	return err
}

func (s *Server) chatCompletions(c *fiber.Ctx) error { return s.openAIComplete(c, true) }
func (s *Server) completions(c *fiber.Ctx) error     { return s.openAIComplete(c, false) }

func finishReason(stopType string) string {
	if stopType == "limit" {
		return "length"
	}
	return "stop"
}

func (s *Server) openAIComplete(c *fiber.Ctx, chat bool) error {
	req, r, adm, err := s.openAITask(c, chat)
	if err != nil {
		return err
	}
	id, object := "cmpl-"+req.TaskID, "text_completion"
	if chat {
		id, object = "chatcmpl-"+req.TaskID, "chat.completion"
	}
	created := time.Now().Unix()
	wantLogprobs := req.Params.Logprobs
	if !r.Stream {
		var lps []*task.Logprob
		if wantLogprobs {
			lps = s.streamLogprobs(c.UserContext(), req.TaskID)
		}
		st, err := s.deps.Tasks.Result(c.UserContext(), req.TaskID)
		if err != nil {
			return outputError(err)
		}
		if st.State != task.Completed {
			return taskFailure(st)
		}
		choice := fiber.Map{"index": 0, "finish_reason": finishReason(st.StopType), "logprobs": nil}
		switch {
		case wantLogprobs && chat:
			choice["logprobs"] = chatLogprobs(lps)
		case wantLogprobs:
			choice["logprobs"] = completionLogprobs(lps, 0)
		}
		if chat {
			choice["message"] = fiber.Map{"role": "assistant", "content": st.Text}
		} else {
			choice["text"] = st.Text
		}
		return c.JSON(fiber.Map{"id": id, "object": object, "created": created, "model": req.ModelID,
			"choices": []any{choice}, "usage": usage(st.TokensIn, st.TokensOut, st.TokensCached)})
	}
	includeUsage := r.StreamOptions != nil && r.StreamOptions.IncludeUsage
	log := s.log(c).With("task_id", req.TaskID)
	chunkObject := "text_completion"
	if chat {
		chunkObject = "chat.completion.chunk"
	}
	chunk := func(delta fiber.Map, text string, finish any) fiber.Map {
		ch := fiber.Map{"index": 0, "finish_reason": finish, "logprobs": nil}
		if chat {
			ch["delta"] = delta
		} else {
			ch["text"] = text
		}
		return fiber.Map{"id": id, "object": chunkObject, "created": created, "model": req.ModelID, "choices": []any{ch}}
	}
	var head []byte
	if chat {
		head = sseData(chunk(fiber.Map{"role": "assistant", "content": ""}, "", nil))
	}
	tokens := newTokenChunks(func(text string) any { return chunk(fiber.Map{"content": text}, text, nil) })
	offset := 0 // of the next token's text, for the legacy completions' logprobs
	s.openAIStream(c, req.TaskID, adm, log, head, func(ev task.Event) []byte {
		switch ev.Type {
		case "token":
			if wantLogprobs && ev.LP != nil {
				ch := chunk(fiber.Map{"content": ev.T}, ev.T, nil)
				choice := ch["choices"].([]any)[0].(fiber.Map)
				if chat {
					choice["logprobs"] = chatLogprobs([]*task.Logprob{ev.LP})
				} else {
					choice["logprobs"] = completionLogprobs([]*task.Logprob{ev.LP}, offset)
					offset += len(ev.LP.T)
				}
				return sseData(ch)
			}
			if ev.T == "" {
				return nil
			}
			return tokens.render(ev.T)
		case "end":
			out := sseData(chunk(fiber.Map{}, "", finishReason(ev.StopType)))
			if includeUsage {
				u := chunk(nil, "", nil)
				u["choices"] = []any{}
				u["usage"] = usage(ev.TokensIn, ev.TokensOut, ev.TokensCached)
				out = append(out, sseData(u)...)
			}
			return append(out, "data: [DONE]\n\n"...)
		case "error":
			e := ev.Error
			out := sseData(fiber.Map{"error": fiber.Map{"message": e.Message, "type": "server_error", "code": strings.ToLower(e.Code), "param": nil}})
			return append(out, "data: [DONE]\n\n"...)
		}
		return nil
	})
	return nil
}

// openAIStream streams a /v1 task's events as render makes them, after
// head; a client that leaves cancels the task, as OpenAI clients expect.
func (s *Server) openAIStream(c *fiber.Ctx, taskID string, adm scheduler.Admission, log *slog.Logger, head []byte, render func(task.Event) []byte) {
	c.Set(fiber.HeaderContentType, "text/event-stream")
	c.Set(fiber.HeaderCacheControl, "no-cache")
	c.Set("X-Accel-Buffering", "no")
	c.Context().SetBodyStreamWriter(s.guardStream(log, func(w *bufio.Writer) {
		stream, release := s.readStream(taskID)
		defer release()
		if head != nil {
			_, _ = w.Write(head)
		}
		err := s.writeStream(w, stream, tokenstream.Cursor{}, render)
		if err == nil || errors.Is(err, errShuttingDown) {
			return
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		// Its workflow must exist to be canceled (its start may still
		// be under way); one that did not start has nothing to cancel.
		if adm.Durable(cctx) != nil {
			return
		}
		if cerr := s.cancel(cctx, taskID, "client disconnected"); cerr != nil {
			log.Debug("cancel after disconnect", "err", cerr)
		} else {
			log.Info("client left the stream: task canceled")
		}
	}))
}

// usage is OpenAI's, with the prompt tokens a slot's cache held.
func usage(in, out, cached int) fiber.Map {
	return fiber.Map{"prompt_tokens": in, "completion_tokens": out, "total_tokens": in + out,
		"prompt_tokens_details": fiber.Map{"cached_tokens": cached}}
}

// taskFailure is a failed task as an API error.
func taskFailure(st task.Status) error {
	e := st.Error
	if e == nil {
		e = &task.Error{Code: "INTERNAL", Message: "task ended " + string(st.State)}
	}
	status := fiber.StatusInternalServerError
	switch e.Code {
	case task.ErrPoolUnavailable, task.ErrWorkerReset:
		status = fiber.StatusServiceUnavailable
	case task.ErrDeadline:
		status = fiber.StatusGatewayTimeout
	case task.ErrCanceled:
		status = 499
	}
	ae := apiError(status, e.Code, "%s", e.Message)
	ae.Retriable, ae.RetryAfterMs = e.Retriable, e.RetryAfterMs
	return ae
}

func (s *Server) openAIModels(c *fiber.Ctx) error {
	entries, err := s.entries(c.UserContext())
	if err != nil {
		return err
	}
	data := []fiber.Map{}
	for _, e := range entries {
		if e.Lifecycle != model.Active {
			continue
		}
		data = append(data, openAIModel(e))
	}
	return c.JSON(fiber.Map{"object": "list", "data": data})
}

// openAIModel is GET /v1/models/{id}: a model the list shows (in the
// catalog and active), else OpenAI's model_not_found.
func (s *Server) openAIModel(c *fiber.Ctx) error {
	id := c.Params("id")
	if model.ValidateID(id) != nil { // no model has such an id
		return modelNotFound(apiError(fiber.StatusNotFound, CodeModelNotFound, "not found"), id)
	}
	e, err := s.entry(c.UserContext(), id)
	var ae *Error
	if errors.As(err, &ae) && ae.Code == CodeModelNotFound || err == nil && e.Lifecycle != model.Active {
		return modelNotFound(apiError(fiber.StatusNotFound, CodeModelNotFound, "not found"), id)
	}
	if err != nil {
		return err
	}
	return c.JSON(openAIModel(e))
}

func openAIModel(e model.Entry) fiber.Map {
	return fiber.Map{"id": e.ID, "object": "model", "created": e.CreatedAt.Unix(), "owned_by": "llorch"}
}
