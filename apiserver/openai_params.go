package apiserver

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/llorch/llorch/grammar"
	"github.com/llorch/llorch/task"
)

// Every field of a /v1 request is honoured, accepted only at the value
// that asks for nothing, or refused with a 400 naming it: a client is
// never left believing a parameter took effect when it did not.
// docs/openai.md tables them.

// openAIHonoured are the fields the request types read (openAIRequest).
var openAIHonoured = map[string]bool{
	"model": true, "max_tokens": true, "temperature": true, "top_p": true, "top_k": true,
	"seed": true, "stop": true, "n": true, "stream": true, "stream_options": true, "user": true, "logprobs": true,
}

// openAIHonouredBy are the fields one endpoint alone honours.
var openAIHonouredBy = map[bool]map[string]bool{
	true:  {"messages": true, "max_completion_tokens": true, "response_format": true, "top_logprobs": true},
	false: {"prompt": true},
}

// neutralRule accepts a field only at values that ask for nothing; why
// says what other values would need.
type neutralRule struct {
	neutral func(raw json.RawMessage) bool
	why     string
}

func isJSON(want ...string) func(json.RawMessage) bool {
	return func(raw json.RawMessage) bool {
		return slices.Contains(want, string(bytes.TrimSpace(raw)))
	}
}

// zero: a number equal to 0.
func zero(raw json.RawMessage) bool {
	var f float64
	return json.Unmarshal(raw, &f) == nil && f == 0
}

// emptyObject: {} or [] (OpenAI clients send empty maps and lists).
func emptyObject(raw json.RawMessage) bool { return isJSON("{}", "[]")(raw) }

func textModalities(raw json.RawMessage) bool {
	var m []string
	return json.Unmarshal(raw, &m) == nil && (len(m) == 0 || slices.Equal(m, []string{"text"}))
}

// openAINeutral are OpenAI's fields llorch does not act on (yet), with
// the values at which they ask for nothing.
var openAINeutral = map[string]neutralRule{
	"frequency_penalty":   {zero, "only 0 is supported (no frequency penalty)"},
	"presence_penalty":    {zero, "only 0 is supported (no presence penalty)"},
	"logit_bias":          {emptyObject, "logit bias is not supported"},
	"tools":               {emptyObject, "tool calls are not supported yet"},
	"tool_choice":         {isJSON(`"none"`), `tool calls are not supported yet: only "none"`},
	"parallel_tool_calls": {isJSON("true", "false"), "tool calls are not supported yet"},
	"functions":           {emptyObject, "function calls are not supported"},
	"function_call":       {isJSON(`"none"`), `function calls are not supported: only "none"`},
	"store":               {isJSON("false"), "llorch stores no completions for later retrieval"},
	"metadata":            {emptyObject, "llorch stores no completions, so no metadata"},
	"service_tier":        {isJSON(`"auto"`, `"default"`), `service tiers are not offered: only "auto" or "default"`},
	"modalities":          {textModalities, `only ["text"] is supported`},
	"audio":               {isJSON("{}"), "audio output is not supported"},
	"prediction":          {isJSON("{}"), "predicted outputs are not supported"},
	"reasoning_effort":    {isJSON(), "reasoning effort is not supported"},
	"verbosity":           {isJSON(), "verbosity is not supported"},
	"web_search_options":  {isJSON("{}"), "web search is not supported"},
	"prompt_cache_key":    {isJSON(`""`), "prompt cache keys are not supported yet"},
	"safety_identifier":   {isJSON(`""`), "safety identifiers are not supported: pass user"},
	"echo":                {isJSON("false"), "echoing the prompt is not supported"},
	"best_of":             {isJSON("1"), "best_of above 1 is not supported"},
	"suffix":              {isJSON(`""`), "suffixes (insertion) are not supported"},
}

// checkOpenAIFields refuses every field of body that the endpoint does
// not honour, unless it has the value that asks for nothing; a field
// OpenAI does not define is refused as OpenAI refuses it. null is absent.
func checkOpenAIFields(body []byte, chat bool) error {
	other := "/v1/chat/completions"
	if chat {
		other = "/v1/completions"
	}
	fields, err := checkFields(body, func(k string) bool { return openAIHonoured[k] || openAIHonouredBy[chat][k] },
		openAINeutral, func(k string) error {
			if openAIHonouredBy[!chat][k] {
				return invalidParam(k, "is a field of %s", other)
			}
			return nil
		})
	if err != nil || !chat {
		return err
	}
	return checkMessageFields(fields["messages"])
}

// checkFields checks each field of the object body, in name order (the
// same body is refused for the same field): honoured, or null, passes;
// misplaced may refuse it first; then neutral's rule, and a field no rule
// names is refused as OpenAI refuses it. It returns the fields.
func checkFields(body []byte, honoured func(string) bool, neutral map[string]neutralRule, misplaced func(string) error) (map[string]json.RawMessage, error) {
	var fields map[string]json.RawMessage
	if json.Unmarshal(body, &fields) != nil {
		return nil, nil // not an object: the typed decode names the problem
	}
	for _, k := range sortedKeys(fields) {
		raw := fields[k]
		if honoured(k) || string(bytes.TrimSpace(raw)) == "null" {
			continue
		}
		if misplaced != nil {
			if err := misplaced(k); err != nil {
				return nil, err
			}
		}
		rule, known := neutral[k]
		if !known && k == "" {
			return nil, invalidParam("body", `unrecognized request argument ""`)
		}
		if !known {
			return nil, invalidParam(k, "unrecognized request argument")
		}
		if !rule.neutral(raw) {
			return nil, invalidParam(k, "%s", rule.why)
		}
	}
	return fields, nil
}

// checkMessageFields refuses fields of chat messages that llorch does not
// honour: a message is its role and its content.
func checkMessageFields(raw json.RawMessage) error {
	var msgs []map[string]json.RawMessage
	if json.Unmarshal(raw, &msgs) != nil {
		return nil // the typed decode names the problem
	}
	for i, m := range msgs {
		for _, k := range sortedKeys(m) {
			field := fmt.Sprintf("messages[%d].%s", i, k)
			switch v := string(bytes.TrimSpace(m[k])); {
			case k == "role" || k == "content" || v == "null":
			case k == "name" && v == `""`:
			case k == "name":
				return invalidParam(field, "participant names are not supported")
			case k == "tool_calls" || k == "tool_call_id" || k == "function_call":
				return invalidParam(field, "tool calls are not supported yet")
			default:
				return invalidParam(field, "unrecognized message field")
			}
		}
	}
	return nil
}

// openAIRoles are the chat roles the engines' templates render; OpenAI's
// developer role is its newer name for system.
func openAIRole(role string) (string, bool) {
	switch strings.ToLower(role) {
	case "system", "developer":
		return "system", true
	case "user":
		return "user", true
	case "assistant":
		return "assistant", true
	}
	return "", false
}

// responseFormat is the grammar a chat request's response_format holds
// the output to: none for text, any JSON object for json_object, the
// schema's documents for json_schema (package grammar). What the grammar
// cannot enforce is refused naming where.
func responseFormat(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return "", nil
	}
	var f struct {
		Type       string          `json:"type"`
		JSONSchema json.RawMessage `json:"json_schema"`
	}
	if err := decodeField(raw, &f, "response_format"); err != nil {
		return "", err
	}
	var js struct {
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Schema      json.RawMessage `json:"schema"`
		Strict      *bool           `json:"strict"`
	}
	if len(f.JSONSchema) > 0 {
		if f.Type != "json_schema" {
			return "", invalidParam("response_format.json_schema", "only with type json_schema")
		}
		if err := decodeField(f.JSONSchema, &js, "response_format.json_schema"); err != nil {
			return "", err
		}
	}
	switch f.Type {
	case "text":
		return "", nil
	case "json_object":
		return grammar.JSONObject(), nil
	case "json_schema":
		if len(js.Schema) == 0 {
			return "", invalidParam("response_format.json_schema.schema", "is required with type json_schema")
		}
		// strict or not, the grammar enforces the schema: a schema it
		// cannot enforce is refused either way.
		g, err := grammar.FromSchema(js.Schema)
		if err != nil {
			return "", invalidParam("response_format.json_schema.schema", "%v", err)
		}
		return g, nil
	}
	return "", invalidParam("response_format.type", "want text, json_object or json_schema, got %q", f.Type)
}

// decodeField decodes the object raw strictly into dst, naming a refused
// field below prefix.
func decodeField(raw json.RawMessage, dst any, prefix string) error {
	err := decodeStrict(raw, dst)
	var e *Error
	if !errors.As(err, &e) {
		return err
	}
	if e.Field == "body" {
		return invalidParam(prefix, "want a JSON object of its fields")
	}
	return invalidParam(prefix+"."+e.Field, "%s", strings.TrimPrefix(e.Message, e.Field+": "))
}

// logprobsParams reads what a request asks of log probabilities: chat's
// logprobs (a boolean) with top_logprobs (0-20), or the legacy
// completions' logprobs (the number of alternatives, 0-5).
func logprobsParams(chat bool, logprobs json.RawMessage, top *int) (on bool, n int, err error) {
	if chat {
		if len(logprobs) > 0 && string(logprobs) != "null" {
			if err := json.Unmarshal(logprobs, &on); err != nil {
				return false, 0, invalidParam("logprobs", "want true or false")
			}
		}
		if top != nil {
			if !on {
				return false, 0, invalidParam("top_logprobs", "needs logprobs: true")
			}
			if *top < 0 || *top > task.MaxTopLogprobs {
				return false, 0, invalidParam("top_logprobs", "must be from 0 to %d", task.MaxTopLogprobs)
			}
			n = *top
		}
		return on, n, nil
	}
	if len(logprobs) == 0 || string(logprobs) == "null" {
		return false, 0, nil
	}
	if err := json.Unmarshal(logprobs, &n); err != nil || n < 0 || n > 5 {
		return false, 0, invalidParam("logprobs", "want the number of alternatives per token, 0 to 5")
	}
	return true, n, nil
}

// refusedParam is the metric label of a refusal by checkFields: the
// field's name where a table of ours names it (bounded), else
// "unrecognized" (a client may send any name).
func refusedParam(err error) string {
	e, ok := err.(*Error)
	if !ok {
		return "unrecognized"
	}
	k, _, _ := strings.Cut(e.Field, "[") // messages[3].name: messages
	_, neutral := openAINeutral[k]
	_, respNeutral := responsesNeutral[k]
	if neutral || respNeutral || openAIHonoured[k] || openAIHonouredBy[true][k] || openAIHonouredBy[false][k] || responsesHonoured[k] {
		return k
	}
	return "unrecognized"
}
