package apiserver

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Every /v1 field is honoured, accepted at its neutral value, or refused
// naming it: nothing a client sends is silently dropped.
func TestOpenAIFieldsHonouredOrRefused(t *testing.T) {
	chat := `"model":"m","messages":[{"role":"user","content":"hi"}]`
	comp := `"model":"m","prompt":"once"`
	cases := []struct {
		chat  bool
		extra string
		field string // "" when accepted
	}{
		{true, `"max_completion_tokens":3,"top_k":4,"user":"u-1","stream_options":{"include_usage":true}`, ""},
		{true, `"frequency_penalty":0,"presence_penalty":0.0,"logprobs":false,"top_logprobs":0,"logit_bias":{}`, ""},
		{true, `"response_format":{"type":"text"},"tools":[],"tool_choice":"none","parallel_tool_calls":true,"store":false`, ""},
		{true, `"service_tier":"auto","modalities":["text"],"metadata":{},"seed":null,"logprobs":null`, ""},
		{false, `"echo":false,"best_of":1,"suffix":"","max_tokens":5`, ""},
		{true, `"frequency_penalty":0.5`, "frequency_penalty"},
		{true, `"presence_penalty":-1`, "presence_penalty"},
		{true, `"logprobs":true,"top_logprobs":3`, ""},
		{false, `"logprobs":2`, ""},
		{false, `"top_logprobs":2`, "top_logprobs"},
		{true, `"logit_bias":{"42":-100}`, "logit_bias"},
		{false, `"response_format":{"type":"json_object"}`, "response_format"},
		{true, `"tools":[{"type":"function","function":{"name":"f"}}]`, "tools"},
		{true, `"tool_choice":"auto"`, "tool_choice"},
		{true, `"functions":[{"name":"f"}]`, "functions"},
		{true, `"store":true`, "store"},
		{true, `"metadata":{"a":"b"}`, "metadata"},
		{true, `"service_tier":"flex"`, "service_tier"},
		{true, `"modalities":["text","audio"]`, "modalities"},
		{true, `"audio":{"voice":"alloy"}`, "audio"},
		{true, `"reasoning_effort":"low"`, "reasoning_effort"},
		{true, `"prompt_cache_key":"k"`, "prompt_cache_key"},
		{true, `"no_such_field":1`, "no_such_field"},
		{true, `"prompt":"x"`, "prompt"},
		{false, `"messages":[]`, "messages"},
		{false, `"max_completion_tokens":3`, "max_completion_tokens"},
		{false, `"echo":true`, "echo"},
		{false, `"best_of":2`, "best_of"},
		{false, `"suffix":"end"`, "suffix"},
		// Within messages.
		{true, `"messages":[{"role":"user","content":"a","name":"bob"}]`, "messages[0].name"},
		{true, `"messages":[{"role":"user","content":"a"},{"role":"assistant","content":null,"tool_calls":[]}]`, "messages[1].tool_calls"},
		{true, `"messages":[{"role":"user","content":"a","weight":1}]`, "messages[0].weight"},
		{true, `"messages":[{"role":"user","content":"a","name":""}]`, ""},
	}
	for _, c := range cases {
		base := comp
		if c.chat {
			base = chat
		}
		body := fmt.Sprintf("{%s,%s}", base, c.extra)
		if c.chat && strings.HasPrefix(c.extra, `"messages":`) {
			body = fmt.Sprintf(`{"model":"m",%s}`, c.extra)
		}
		err := checkOpenAIFields([]byte(body), c.chat)
		if c.field == "" {
			require.NoError(t, err, body)
			continue
		}
		var e *Error
		require.True(t, errors.As(err, &e), "%s: %v", body, err)
		require.Equal(t, 400, e.Status, body)
		require.Equal(t, CodeInvalidParams, e.Code, body)
		require.Equal(t, c.field, e.Field, body)
	}
}

// Roles: OpenAI's developer is system; a role no template renders is
// refused naming the message.
func TestOpenAIRoles(t *testing.T) {
	for _, role := range []string{"system", "developer", "user", "assistant"} {
		r := openAIRequest{Model: "m", Messages: []openAIMessage{{Role: role, Content: []byte(`"x"`)}}}
		in, _, err := r.input(true)
		require.NoError(t, err, role)
		want := role
		if role == "developer" {
			want = "system"
		}
		require.Equal(t, want, in.messages[0].Role)
	}
	r := openAIRequest{Model: "m", Messages: []openAIMessage{{Role: "user", Content: []byte(`"x"`)}, {Role: "tool", Content: []byte(`"y"`)}}}
	_, _, err := r.input(true)
	var e *Error
	require.True(t, errors.As(err, &e))
	require.Equal(t, "messages[1].role", e.Field)
}

// response_format: text is no grammar, json_object and json_schema hold
// the output to JSON; what the grammar cannot enforce is refused naming
// where.
func TestOpenAIResponseFormat(t *testing.T) {
	g, err := responseFormat([]byte(`{"type":"text"}`))
	require.NoError(t, err)
	require.Empty(t, g)
	g, err = responseFormat([]byte(`{"type":"json_object"}`))
	require.NoError(t, err)
	require.Contains(t, g, "root ::= object")
	g, err = responseFormat([]byte(`{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","properties":{"a":{"type":"boolean"}},"required":["a"],"additionalProperties":false}}}`))
	require.NoError(t, err)
	require.Contains(t, g, `"\"a\""`)
	for body, field := range map[string]string{
		`{"type":"json"}`:                                    "response_format.type",
		`{"type":"text","extra":1}`:                          "response_format.extra",
		`{"type":"json_object","json_schema":{"schema":{}}}`: "response_format.json_schema",
		`{"type":"json_schema"}`:                             "response_format.json_schema.schema",
		`{"type":"json_schema","json_schema":{"schema":{"type":"string","pattern":"a"}}}`: "response_format.json_schema.schema",
		`{"type":"json_schema","json_schema":{"schema":{},"nme":"x"}}`:                    "response_format.json_schema.nme",
		`"json"`: "response_format",
	} {
		_, err := responseFormat([]byte(body))
		var e *Error
		require.True(t, errors.As(err, &e), "%s: %v", body, err)
		require.Equal(t, field, e.Field, "%s: %v", body, err)
	}
}

// logprobs: chat's boolean with top_logprobs 0-20, the legacy
// completions' count 0-5; each refusal names its field.
func TestOpenAILogprobs(t *testing.T) {
	ptr := func(n int) *int { return &n }
	for _, c := range []struct {
		chat  bool
		lp    string
		top   *int
		on    bool
		n     int
		field string
	}{
		{true, ``, nil, false, 0, ""},
		{true, `false`, nil, false, 0, ""},
		{true, `true`, nil, true, 0, ""},
		{true, `true`, ptr(20), true, 20, ""},
		{true, `true`, ptr(21), false, 0, "top_logprobs"},
		{true, `false`, ptr(2), false, 0, "top_logprobs"},
		{true, `3`, nil, false, 0, "logprobs"},
		{false, `0`, nil, true, 0, ""},
		{false, `5`, nil, true, 5, ""},
		{false, `6`, nil, false, 0, "logprobs"},
		{false, `true`, nil, false, 0, "logprobs"},
	} {
		on, n, err := logprobsParams(c.chat, []byte(c.lp), c.top)
		if c.field != "" {
			var e *Error
			require.True(t, errors.As(err, &e), "%+v", c)
			require.Equal(t, c.field, e.Field)
			continue
		}
		require.NoError(t, err, "%+v", c)
		require.Equal(t, c.on, on, "%+v", c)
		require.Equal(t, c.n, n, "%+v", c)
	}
}
