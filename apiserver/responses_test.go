package apiserver

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// /v1/responses maps onto a chat turn; what it does not honour is refused
// naming the field as the Responses API calls it.
func TestResponsesRequest(t *testing.T) {
	rr := responsesRequest{Model: "m", Instructions: "be brief",
		Input: []byte(`[{"role":"user","content":"a"},{"type":"message","role":"assistant","id":"msg_1","status":"completed","content":[{"type":"output_text","text":"b","annotations":[]}]},{"role":"developer","content":[{"type":"input_text","text":"c"}]}]`),
		Text:  []byte(`{"format":{"type":"json_schema","name":"x","strict":true,"schema":{"type":"boolean"}}}`)}
	r, err := rr.chat()
	require.NoError(t, err)
	in, _, err := r.input(true)
	require.NoError(t, err)
	require.Len(t, in.messages, 4)
	require.Equal(t, "system", in.messages[0].Role)
	require.Equal(t, "b", in.messages[2].Content)
	require.Equal(t, "system", in.messages[3].Role, "developer is system")
	require.Contains(t, in.params.Grammar, `"true" | "false"`)

	one := responsesRequest{Model: "m", Input: []byte(`"hi"`)}
	r, err = one.chat()
	require.NoError(t, err)
	require.Len(t, r.Messages, 1)

	for _, c := range []struct {
		rr    responsesRequest
		field string
	}{
		{responsesRequest{Model: "m"}, "input"},
		{responsesRequest{Model: "m", Input: []byte(`[]`)}, "input"},
		{responsesRequest{Model: "m", Input: []byte(`[{"type":"function_call_output","call_id":"c","output":"x"}]`)}, "input[0].call_id"},
		{responsesRequest{Model: "m", Input: []byte(`[{"type":"reasoning","role":"user","content":"x"}]`)}, "input[0].type"},
		{responsesRequest{Model: "m", Input: []byte(`[{"role":"user","content":[{"type":"input_image","image_url":"u"}]}]`)}, "input[0].content[0].type"},
		{responsesRequest{Model: "m", Input: []byte(`[{"role":"tool","content":"x"}]`)}, "input[0].role"},
		{responsesRequest{Model: "m", Instructions: "i", Input: []byte(`[{"role":"user","content":"x"},{"role":"tool","content":"x"}]`)}, "input[1].role"},
		{responsesRequest{Model: "m", Input: []byte(`"x"`), Text: []byte(`{"verbosity":"low"}`)}, "text.verbosity"},
		{responsesRequest{Model: "m", Input: []byte(`"x"`), Text: []byte(`{"format":{"type":"json_schema"}}`)}, "text.format.schema"},
		{responsesRequest{Model: "m", Input: []byte(`"x"`), Text: []byte(`{"format":{"type":"json_schema","name":"n","schema":{"pattern":"a"}}}`)}, "text.format.schema"},
	} {
		r, err := c.rr.chat()
		if err == nil {
			_, _, err = r.input(true)
		}
		err = c.rr.mapField(err)
		var e *Error
		require.True(t, errors.As(err, &e), "%+v: %v", c.rr, err)
		require.Equal(t, c.field, e.Field, "%+v: %v", c.rr, err)
	}
	require.NoError(t, checkResponsesFields([]byte(`{"model":"m","input":"x","store":false,"tools":[],"tool_choice":"auto","truncation":"disabled","metadata":{},"include":[],"reasoning":null}`)))
	for body, field := range map[string]string{
		`{"model":"m","input":"x","store":true}`:                    "store",
		`{"model":"m","input":"x","previous_response_id":"resp_1"}`: "previous_response_id",
		`{"model":"m","input":"x","tools":[{"type":"web_search"}]}`: "tools",
		`{"model":"m","input":"x","background":true}`:               "background",
		`{"model":"m","input":"x","truncation":"auto"}`:             "truncation",
		`{"model":"m","input":"x","messages":[]}`:                   "messages",
	} {
		err := checkResponsesFields([]byte(body))
		var e *Error
		require.True(t, errors.As(err, &e), "%s: %v", body, err)
		require.Equal(t, field, e.Field, body)
	}
}
