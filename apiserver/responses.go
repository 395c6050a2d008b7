package apiserver

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/task"
)

// POST /v1/responses: OpenAI's Responses API for the part of it that is a
// chat turn (text in, text or JSON out, streamed or whole, usage). Each
// field is honoured or refused naming it, as on the other /v1 routes;
// docs/openai.md tables them.

// responsesHonoured are the fields responsesRequest reads.
var responsesHonoured = map[string]bool{
	"model": true, "input": true, "instructions": true, "max_output_tokens": true, "temperature": true,
	"top_p": true, "stream": true, "text": true, "user": true,
}

// responsesNeutral are the Responses API's fields llorch does not act on,
// with the values at which they ask for nothing.
var responsesNeutral = map[string]neutralRule{
	"store":                {isJSON("false"), "llorch stores no responses (send store: false)"},
	"previous_response_id": {isJSON(), "llorch stores no responses to continue: send the conversation in input"},
	"conversation":         {isJSON(), "llorch keeps no conversations: send the conversation in input"},
	"tools":                {emptyObject, "tool calls are not supported yet"},
	"tool_choice":          {isJSON(`"none"`, `"auto"`), `tool calls are not supported yet: only "none" or "auto" without tools`},
	"parallel_tool_calls":  {isJSON("true", "false"), "tool calls are not supported yet"},
	"max_tool_calls":       {isJSON(), "tool calls are not supported yet"},
	"truncation":           {isJSON(`"disabled"`), `only "disabled": a prompt above the context is refused, not cut`},
	"metadata":             {emptyObject, "llorch stores no responses, so no metadata"},
	"reasoning":            {emptyObject, "reasoning settings are not supported"},
	"include":              {emptyObject, "no extra output is included"},
	"background":           {isJSON("false"), "background responses are not supported: stream instead"},
	"service_tier":         {isJSON(`"auto"`, `"default"`), `service tiers are not offered: only "auto" or "default"`},
	"top_logprobs":         {zero, "log probabilities are not supported on /v1/responses yet: use /v1/chat/completions"},
	"prompt":               {isJSON(), "stored prompts are not supported"},
	"prompt_cache_key":     {isJSON(`""`), "prompt cache keys are not supported yet"},
	"safety_identifier":    {isJSON(`""`), "safety identifiers are not supported: pass user"},
	"stream_options":       {emptyObject, "no stream options are supported"},
}

type responsesRequest struct {
	Model           string          `json:"model"`
	Input           json.RawMessage `json:"input"`
	Instructions    string          `json:"instructions"`
	MaxOutputTokens *int            `json:"max_output_tokens"`
	Temperature     *float64        `json:"temperature"`
	TopP            *float64        `json:"top_p"`
	Stream          bool            `json:"stream"`
	Text            json.RawMessage `json:"text"`
	User            string          `json:"user"`
}

// checkResponsesFields refuses what /v1/responses does not honour.
func checkResponsesFields(body []byte) error {
	_, err := checkFields(body, func(k string) bool { return responsesHonoured[k] }, responsesNeutral, nil)
	return err
}

// chat is the request as the chat turn it maps onto.
func (r responsesRequest) chat() (openAIRequest, error) {
	out := openAIRequest{Model: r.Model, MaxCompletionTokens: r.MaxOutputTokens, Temperature: r.Temperature,
		TopP: r.TopP, Stream: r.Stream, User: r.User}
	if r.Instructions != "" {
		out.Messages = append(out.Messages, openAIMessage{Role: "system", Content: jsonString(r.Instructions)})
	}
	msgs, err := responsesInput(r.Input)
	if err != nil {
		return out, err
	}
	out.Messages = append(out.Messages, msgs...)
	if out.ResponseFormat, err = responsesFormat(r.Text); err != nil {
		return out, err
	}
	return out, nil
}

func jsonString(s string) json.RawMessage {
	b, _ := json.Marshal(s)
	return b
}

// responsesInput reads input: a string (one user message) or a list of
// messages, each a role and content (a string or input_text and
// output_text parts).
func responsesInput(raw json.RawMessage) ([]openAIMessage, error) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, invalidParam("input", "is required")
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return []openAIMessage{{Role: "user", Content: raw}}, nil
	}
	var items []map[string]json.RawMessage
	if json.Unmarshal(raw, &items) != nil || len(items) == 0 {
		return nil, invalidParam("input", "want a string or a non-empty array of messages")
	}
	msgs := make([]openAIMessage, 0, len(items))
	for i, it := range items {
		at := fmt.Sprintf("input[%d]", i)
		for _, k := range sortedKeys(it) {
			switch k {
			case "role", "content":
			case "type":
				var t string
				if json.Unmarshal(it[k], &t) != nil || t != "message" {
					return nil, invalidParam(at+".type", "only message items are supported, got %s", it[k])
				}
			case "id", "status": // an earlier output item sent back as history
			default:
				return nil, invalidParam(at+"."+k, "unrecognized message field")
			}
		}
		var role string
		if json.Unmarshal(it["role"], &role) != nil || role == "" {
			return nil, invalidParam(at+".role", "is required")
		}
		content, err := responsesContent(it["content"], at+".content")
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, openAIMessage{Role: role, Content: jsonString(content)})
	}
	return msgs, nil
}

// responsesContent is a message's text: a string, or its text parts.
func responsesContent(raw json.RawMessage, at string) (string, error) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []map[string]json.RawMessage
	if json.Unmarshal(raw, &parts) != nil {
		return "", invalidParam(at, "want a string or an array of text parts")
	}
	var b strings.Builder
	for j, p := range parts {
		var typ, text string
		_ = json.Unmarshal(p["type"], &typ)
		if typ != "input_text" && typ != "output_text" {
			return "", invalidParam(fmt.Sprintf("%s[%d].type", at, j), "only input_text and output_text parts are supported, got %q", typ)
		}
		for _, k := range sortedKeys(p) {
			if k != "type" && k != "text" && k != "annotations" {
				return "", invalidParam(fmt.Sprintf("%s[%d].%s", at, j, k), "unrecognized part field")
			}
		}
		if json.Unmarshal(p["text"], &text) != nil {
			return "", invalidParam(fmt.Sprintf("%s[%d].text", at, j), "want a string")
		}
		b.WriteString(text)
	}
	return b.String(), nil
}

// responsesFormat maps text.format onto chat's response_format.
func responsesFormat(raw json.RawMessage) (json.RawMessage, error) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	var t struct {
		Format json.RawMessage `json:"format"`
	}
	if err := decodeField(raw, &t, "text"); err != nil {
		return nil, err
	}
	if len(t.Format) == 0 {
		return nil, nil
	}
	var f struct {
		Type        string          `json:"type"`
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Schema      json.RawMessage `json:"schema"`
		Strict      *bool           `json:"strict"`
	}
	if err := decodeField(t.Format, &f, "text.format"); err != nil {
		return nil, err
	}
	if f.Type != "json_schema" {
		b, _ := json.Marshal(map[string]string{"type": f.Type})
		return b, nil
	}
	if len(f.Schema) == 0 {
		return nil, invalidParam("text.format.schema", "is required with type json_schema")
	}
	b, _ := json.Marshal(map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": f.Name, "schema": f.Schema}})
	return b, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (s *Server) responses(c *fiber.Ctx) error {
	var rr responsesRequest
	if err := s.openAIBody(c, "responses", &rr, checkResponsesFields); err != nil {
		return err
	}
	r, err := rr.chat()
	if err != nil {
		return rr.mapField(err)
	}
	if err := endUser(c, r.User); err != nil {
		return err
	}
	in, _, err := r.input(true)
	if err != nil {
		return rr.mapField(err)
	}
	req, _, err := s.buildTask(c, in, "max_output_tokens")
	if err != nil {
		return modelNotFound(err, r.Model)
	}
	adm, err := s.submit(c, req, r.Stream)
	if err != nil {
		return err
	}
	resp := newResponse(req, rr)
	if !r.Stream {
		st, err := s.deps.Tasks.Result(c.UserContext(), req.TaskID)
		if err != nil {
			return outputError(err)
		}
		if st.State != task.Completed {
			return taskFailure(st)
		}
		return c.JSON(resp.finished(st.Text, st.StopType, st.TokensIn, st.TokensOut))
	}
	seq := 0
	event := func(typ string, v fiber.Map) []byte {
		v["type"], v["sequence_number"] = typ, seq
		seq++
		b, _ := json.Marshal(v)
		return append(append(append([]byte("event: "+typ+"\ndata: "), b...), '\n'), '\n')
	}
	item := func(status string, content []any) fiber.Map {
		return fiber.Map{"type": "message", "id": resp.msgID, "status": status, "role": "assistant", "content": content}
	}
	head := event("response.created", fiber.Map{"response": resp.object("in_progress", []any{})})
	head = append(head, event("response.in_progress", fiber.Map{"response": resp.object("in_progress", []any{})})...)
	head = append(head, event("response.output_item.added", fiber.Map{"output_index": 0, "item": item("in_progress", []any{})})...)
	head = append(head, event("response.content_part.added", fiber.Map{"item_id": resp.msgID, "output_index": 0, "content_index": 0,
		"part": outputText("")})...)
	var text strings.Builder
	s.openAIStream(c, req.TaskID, adm, s.log(c).With("task_id", req.TaskID), head, func(ev task.Event) []byte {
		switch ev.Type {
		case "token":
			if ev.T == "" {
				return nil
			}
			text.WriteString(ev.T)
			return event("response.output_text.delta", fiber.Map{"item_id": resp.msgID, "output_index": 0, "content_index": 0,
				"delta": ev.T, "logprobs": []any{}})
		case "end":
			all := text.String()
			out := event("response.output_text.done", fiber.Map{"item_id": resp.msgID, "output_index": 0, "content_index": 0, "text": all, "logprobs": []any{}})
			out = append(out, event("response.content_part.done", fiber.Map{"item_id": resp.msgID, "output_index": 0, "content_index": 0, "part": outputText(all)})...)
			out = append(out, event("response.output_item.done", fiber.Map{"output_index": 0, "item": item("completed", []any{outputText(all)})})...)
			done := resp.finished(all, ev.StopType, ev.TokensIn, ev.TokensOut)
			typ := "response.completed"
			if done["status"] == "incomplete" {
				typ = "response.incomplete"
			}
			return append(out, event(typ, fiber.Map{"response": done})...)
		case "error":
			failed := resp.object("failed", []any{})
			failed["error"] = fiber.Map{"code": strings.ToLower(ev.Error.Code), "message": ev.Error.Message}
			return event("response.failed", fiber.Map{"response": failed})
		}
		return nil
	})
	return nil
}

// mapResponsesField renames chat's fields in a refusal to the Responses
// API's: max_completion_tokens is max_output_tokens, response_format is
// text.format, messages[i] is input[i] (less one with instructions, which
// come first).
func (r responsesRequest) mapField(err error) error {
	e, ok := err.(*Error)
	if !ok || e.Field == "" {
		return err
	}
	field := e.Field
	switch {
	case field == "max_completion_tokens":
		field = "max_output_tokens"
	case strings.HasPrefix(field, "response_format.json_schema.schema"):
		field = "text.format.schema" + strings.TrimPrefix(field, "response_format.json_schema.schema")
	case strings.HasPrefix(field, "response_format"):
		field = "text.format" + strings.TrimPrefix(field, "response_format")
	case strings.HasPrefix(field, "messages["):
		idx, rest, _ := strings.Cut(strings.TrimPrefix(field, "messages["), "]")
		if i, err := strconv.Atoi(idx); err == nil {
			if r.Instructions != "" {
				i--
			}
			field = "instructions"
			if i >= 0 {
				field = fmt.Sprintf("input[%d]%s", i, rest)
			}
		}
	}
	out := *e
	out.Field, out.Message = field, field+strings.TrimPrefix(e.Message, e.Field)
	return &out
}

// response is what the answers say of one response.
type response struct {
	id, msgID string
	created   int64
	req       task.Request
	rr        responsesRequest
}

func newResponse(req task.Request, rr responsesRequest) response {
	return response{id: "resp_" + req.TaskID, msgID: "msg_" + req.TaskID, created: time.Now().Unix(), req: req, rr: rr}
}

func outputText(text string) fiber.Map {
	return fiber.Map{"type": "output_text", "text": text, "annotations": []any{}}
}

// object is the response object in state status with output.
func (r response) object(status string, output []any) fiber.Map {
	format := fiber.Map{"type": "text"}
	if r.req.Params.Grammar != "" {
		format = fiber.Map{"type": "json_object"}
		if len(r.rr.Text) > 0 {
			var t struct {
				Format map[string]any `json:"format"`
			}
			if json.Unmarshal(r.rr.Text, &t) == nil && t.Format != nil {
				format = t.Format
			}
		}
	}
	var instructions any
	if r.rr.Instructions != "" {
		instructions = r.rr.Instructions
	}
	return fiber.Map{"id": r.id, "object": "response", "created_at": r.created, "status": status, "model": r.req.ModelID,
		"output": output, "error": nil, "incomplete_details": nil, "instructions": instructions,
		"max_output_tokens": r.req.Params.MaxTokens, "temperature": r.req.Params.Temperature, "top_p": r.req.Params.TopP,
		"parallel_tool_calls": false, "tool_choice": "none", "tools": []any{}, "text": fiber.Map{"format": format},
		"truncation": "disabled", "store": false, "metadata": fiber.Map{}, "previous_response_id": nil,
		"reasoning": fiber.Map{"effort": nil, "summary": nil}, "user": nilIfEmpty(r.rr.User)}
}

// finished is the response object of a turn that ended.
func (r response) finished(text, stopType string, in, out int) fiber.Map {
	status := "completed"
	msgStatus := "completed"
	if stopType == "limit" {
		status, msgStatus = "incomplete", "incomplete"
	}
	o := r.object(status, []any{fiber.Map{"type": "message", "id": r.msgID, "status": msgStatus, "role": "assistant",
		"content": []any{outputText(text)}}})
	if status == "incomplete" {
		o["incomplete_details"] = fiber.Map{"reason": "max_output_tokens"}
	}
	o["usage"] = fiber.Map{"input_tokens": in, "input_tokens_details": fiber.Map{"cached_tokens": 0},
		"output_tokens": out, "output_tokens_details": fiber.Map{"reasoning_tokens": 0}, "total_tokens": in + out}
	return o
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}
