package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/testenv"
)

// requireValid: doc is JSON that schema accepts.
func requireValid(t *testing.T, schema map[string]any, doc string) {
	t.Helper()
	c := jsonschema.NewCompiler()
	require.NoError(t, c.AddResource("schema.json", schema))
	sch, err := c.Compile("schema.json")
	require.NoError(t, err)
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(doc))
	require.NoError(t, err, doc)
	require.NoError(t, sch.Validate(v), doc)
}

// The OpenAI-compatible API read by OpenAI's own Go SDK: models, chat
// completions (plain and streamed with usage), completions, errors in
// OpenAI's shape; a client leaving a stream cancels its task.
func TestOpenAICompatible(t *testing.T) {
	c := newCluster(t)
	id := "e2e-openai"
	w := c.onlineWorker(id)
	h := c.readyPool(id, "op1", "oai-tiny", 81, `,"slots":2,"ctx":8192`)
	ctx := context.Background()
	cl := openai.NewClient(option.WithBaseURL("http://"+c.api+"/v1/"), option.WithAPIKey(token), option.WithMaxRetries(0))

	models, err := cl.Models.List(ctx)
	require.NoError(t, err)
	var ids []string
	for _, m := range models.Data {
		ids = append(ids, m.ID)
	}
	require.Contains(t, ids, "oai-tiny")
	one, err := cl.Models.Get(ctx, "oai-tiny")
	require.NoError(t, err)
	require.Equal(t, "oai-tiny", one.ID)
	require.EqualValues(t, "model", one.Object)

	params := openai.ChatCompletionNewParams{
		Model:       "oai-tiny",
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("be brief"), openai.UserMessage("Hello there")},
		MaxTokens:   openai.Int(24),
		Temperature: openai.Float(0),
	}
	resp, err := cl.Chat.Completions.New(ctx, params)
	require.NoError(t, err)
	require.Len(t, resp.Choices, 1)
	whole := resp.Choices[0].Message.Content
	require.NotEmpty(t, whole)
	require.Equal(t, "length", string(resp.Choices[0].FinishReason))
	require.EqualValues(t, 24, resp.Usage.CompletionTokens)
	require.Positive(t, resp.Usage.PromptTokens)

	// The same request streamed: the same text, usage at the end.
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := cl.Chat.Completions.NewStreaming(ctx, params)
	acc := openai.ChatCompletionAccumulator{}
	chunks := 0
	for stream.Next() {
		acc.AddChunk(stream.Current())
		chunks++
	}
	require.NoError(t, stream.Err())
	require.Greater(t, chunks, 3)
	require.Equal(t, whole, acc.Choices[0].Message.Content, "streamed text equals the plain answer (greedy)")
	require.EqualValues(t, 24, acc.Usage.CompletionTokens)

	// Chat goes through the engine's template: same as asking it directly.
	engine := openai.NewClient(option.WithBaseURL(h["url"].(string)+"/v1/"), option.WithMaxRetries(0))
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{}
	direct, err := engine.Chat.Completions.New(ctx, params)
	require.NoError(t, err)
	require.Equal(t, direct.Choices[0].Message.Content, whole)

	// JSON output, held to a schema by the engine's grammar: it parses and
	// validates, plain and streamed.
	schema := map[string]any{"type": "object", "additionalProperties": false, "required": []any{"ok", "color"},
		"properties": map[string]any{"ok": map[string]any{"type": "boolean"}, "color": map[string]any{"enum": []any{"red", "green"}},
			"note": map[string]any{"type": "string", "maxLength": 5}}}
	jsonParams := openai.ChatCompletionNewParams{Model: "oai-tiny", Temperature: openai.Float(1), Seed: openai.Int(3), MaxTokens: openai.Int(200),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Answer in JSON")},
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &openai.ResponseFormatJSONSchemaParam{
			JSONSchema: openai.ResponseFormatJSONSchemaJSONSchemaParam{Name: "answer", Strict: openai.Bool(true), Schema: schema}}}}
	js, err := cl.Chat.Completions.New(ctx, jsonParams)
	require.NoError(t, err)
	require.Equal(t, "stop", string(js.Choices[0].FinishReason), js.Choices[0].Message.Content)
	requireValid(t, schema, js.Choices[0].Message.Content)
	jsStream := cl.Chat.Completions.NewStreaming(ctx, jsonParams)
	jsAcc := openai.ChatCompletionAccumulator{}
	for jsStream.Next() {
		jsAcc.AddChunk(jsStream.Current())
	}
	require.NoError(t, jsStream.Err())
	require.Equal(t, js.Choices[0].Message.Content, jsAcc.Choices[0].Message.Content, "the same seed streamed")
	jsonParams.ResponseFormat = openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONObject: &openai.ResponseFormatJSONObjectParam{}}
	jsonParams.MaxTokens = openai.Int(60)
	anyObj, err := cl.Chat.Completions.New(ctx, jsonParams)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(anyObj.Choices[0].Message.Content, "{"), anyObj.Choices[0].Message.Content)

	// Log probabilities, the sampled token's and the likeliest others':
	// greedy takes the likeliest; streamed they are the same.
	lpParams := openai.ChatCompletionNewParams{Model: "oai-tiny", Temperature: openai.Float(0), MaxTokens: openai.Int(10),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello there")},
		Logprobs: openai.Bool(true), TopLogprobs: openai.Int(3)}
	lpResp, err := cl.Chat.Completions.New(ctx, lpParams)
	require.NoError(t, err)
	lps := lpResp.Choices[0].Logprobs.Content
	require.Len(t, lps, 10)
	joined := ""
	for _, lp := range lps {
		require.Len(t, lp.TopLogprobs, 3)
		require.Equal(t, lp.TopLogprobs[0].Token, lp.Token, "greedy: the likeliest")
		require.InDelta(t, lp.TopLogprobs[0].Logprob, lp.Logprob, 1e-6)
		require.LessOrEqual(t, lp.Logprob, 0.0)
		joined += lp.Token
	}
	require.Equal(t, lpResp.Choices[0].Message.Content, joined)
	lpStream := cl.Chat.Completions.NewStreaming(ctx, lpParams)
	var streamed []openai.ChatCompletionTokenLogprob
	for lpStream.Next() {
		if ch := lpStream.Current(); len(ch.Choices) > 0 {
			streamed = append(streamed, ch.Choices[0].Logprobs.Content...)
		}
	}
	require.NoError(t, lpStream.Err())
	require.Len(t, streamed, len(lps))
	for i := range lps {
		require.Equal(t, lps[i].Token, streamed[i].Token)
		require.InDelta(t, lps[i].Logprob, streamed[i].Logprob, 1e-6)
	}
	legacy, err := cl.Completions.New(ctx, openai.CompletionNewParams{
		Model: "oai-tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon a time")},
		MaxTokens: openai.Int(6), Temperature: openai.Float(0), Logprobs: openai.Int(2)})
	require.NoError(t, err)
	require.Len(t, legacy.Choices[0].Logprobs.Tokens, 6)
	require.Len(t, legacy.Choices[0].Logprobs.TokenLogprobs, 6)
	require.Equal(t, legacy.Choices[0].Text, strings.Join(legacy.Choices[0].Logprobs.Tokens, ""))

	// The Responses API, as a chat turn: the same text as chat, usage,
	// incomplete at the token limit; streamed, its deltas make the text the
	// completed event holds.
	rp := responses.ResponseNewParams{Model: "oai-tiny", Instructions: openai.String("be brief"),
		Input:           responses.ResponseNewParamsInputUnion{OfString: openai.String("Hello there")},
		MaxOutputTokens: openai.Int(24), Temperature: openai.Float(0), Store: openai.Bool(false)}
	rs, err := cl.Responses.New(ctx, rp)
	require.NoError(t, err)
	require.Equal(t, whole, rs.OutputText(), "the same turn as chat, greedy")
	require.EqualValues(t, "incomplete", rs.Status)
	require.Equal(t, "max_output_tokens", rs.IncompleteDetails.Reason)
	require.EqualValues(t, 24, rs.Usage.OutputTokens)
	require.Positive(t, rs.Usage.InputTokens)
	rstream := cl.Responses.NewStreaming(ctx, rp)
	var deltas strings.Builder
	var final responses.Response
	var types []string
	for rstream.Next() {
		ev := rstream.Current()
		types = append(types, ev.Type)
		switch ev.Type {
		case "response.output_text.delta":
			deltas.WriteString(ev.Delta)
		case "response.completed", "response.incomplete":
			final = ev.Response
		}
	}
	require.NoError(t, rstream.Err())
	require.Equal(t, whole, deltas.String())
	require.Equal(t, whole, final.OutputText())
	require.Equal(t, []string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"}, types[:4])
	require.Equal(t, []string{"response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"}, types[len(types)-4:])
	_, err = cl.Responses.New(ctx, responses.ResponseNewParams{Model: "oai-tiny",
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("hi")}, PreviousResponseID: openai.String("resp_x")})
	var refused *openai.Error
	require.True(t, errors.As(err, &refused), "%v", err)
	require.Equal(t, 400, refused.StatusCode)
	require.Equal(t, "previous_response_id", refused.Param)

	comp, err := cl.Completions.New(ctx, openai.CompletionNewParams{
		Model: "oai-tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon a time")},
		MaxTokens: openai.Int(16), Temperature: openai.Float(0),
	})
	require.NoError(t, err)
	require.Equal(t, greedy(t, h["url"].(string), "Once upon a time", 16), comp.Choices[0].Text)

	// Errors in OpenAI's shape.
	_, err = cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "nope",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
	var apiErr *openai.Error
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 404, apiErr.StatusCode)
	require.Equal(t, "model_not_found", apiErr.Code)
	_, err = cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "oai-tiny",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}, Temperature: openai.Float(7)})
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 400, apiErr.StatusCode)
	require.Equal(t, "temperature", apiErr.Param)
	require.Equal(t, "invalid_request_error", apiErr.Type)
	_, err = cl.Models.Get(ctx, "nope")
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 404, apiErr.StatusCode)
	require.Equal(t, "model_not_found", apiErr.Code)
	// What llorch does not honour is refused naming it, never ignored.
	_, err = cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "oai-tiny",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		Tools:    []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(openai.FunctionDefinitionParam{Name: "f"})}})
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 400, apiErr.StatusCode)
	require.Equal(t, "tools", apiErr.Param)
	_, err = cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "oai-tiny",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &openai.ResponseFormatJSONSchemaParam{
			JSONSchema: openai.ResponseFormatJSONSchemaJSONSchemaParam{Name: "p", Schema: map[string]any{"type": "string", "pattern": "^a"}}}}})
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 400, apiErr.StatusCode)
	require.Equal(t, "response_format.json_schema.schema", apiErr.Param)
	require.Contains(t, apiErr.Message, "pattern")
	bad := openai.NewClient(option.WithBaseURL("http://"+c.api+"/v1/"), option.WithAPIKey("wrong"), option.WithMaxRetries(0))
	_, err = bad.Models.List(ctx)
	require.True(t, errors.As(err, &apiErr), "%v", err)
	require.Equal(t, 401, apiErr.StatusCode)

	// Leaving a stream cancels the task (a slower model: it is surely still
	// generating).
	slow := c.slowPool(id, "op-slow", "oai-slow")
	sctx, cancel := context.WithCancel(ctx)
	long := cl.Chat.Completions.NewStreaming(sctx, openai.ChatCompletionNewParams{Model: "oai-slow",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("go on")}, MaxTokens: openai.Int(3000)})
	for i := 0; i < 5 && long.Next(); i++ {
	}
	taskID := strings.TrimPrefix(long.Current().ID, "chatcmpl-")
	require.NotEmpty(t, taskID)
	cancel()
	long.Close()
	testenv.Eventually(t, 60*time.Second, "task canceled after the client left", func() (bool, string) {
		_, rec := c.get("/v2/tasks/" + taskID)
		return rec["state"] == "Canceled", fmt.Sprint(rec)
	})
	testenv.Eventually(t, 30*time.Second, "engine slot freed", func() (bool, string) { return engineIdle(slow["url"].(string)) })
	c.leave(w, id)
}

// The same OpenAI features on a llama-server pool (LLORCH_LLAMA_SERVER):
// JSON output held to a schema, log probabilities, the Responses API, and
// tokens_in from a text prompt.
func TestOpenAIOnLlamaServer(t *testing.T) {
	bin := os.Getenv("LLORCH_LLAMA_SERVER")
	if bin == "" {
		t.Skip("SKIP (visible on purpose): LLORCH_LLAMA_SERVER is not set, so /v1 is not tried on a llama-server pool")
	}
	c := newCluster(t)
	id := "e2e-oai-ls"
	w := c.onlineWorker(id, "--llama-server", bin)
	c.readyPool(id, "ls1", "ls-tiny", 82, `,"engine":"llama-server","slots":1,"ctx":2048`)
	ctx := context.Background()
	cl := openai.NewClient(option.WithBaseURL("http://"+c.api+"/v1/"), option.WithAPIKey(token), option.WithMaxRetries(0))
	schema := map[string]any{"type": "object", "required": []any{"ok", "color"},
		"properties": map[string]any{"ok": map[string]any{"type": "boolean"}, "color": map[string]any{"enum": []any{"red", "green"}}}}
	js, err := cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "ls-tiny", Temperature: openai.Float(1), Seed: openai.Int(3),
		MaxTokens: openai.Int(200), Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Answer in JSON")},
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &openai.ResponseFormatJSONSchemaParam{
			JSONSchema: openai.ResponseFormatJSONSchemaJSONSchemaParam{Name: "answer", Schema: schema}}}})
	require.NoError(t, err)
	require.Equal(t, "stop", string(js.Choices[0].FinishReason), js.Choices[0].Message.Content)
	requireValid(t, schema, js.Choices[0].Message.Content)
	require.Positive(t, js.Usage.PromptTokens, "tokens_in from llama-server's tokens_evaluated")

	lp, err := cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "ls-tiny", Temperature: openai.Float(0), MaxTokens: openai.Int(6),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello there")}, Logprobs: openai.Bool(true), TopLogprobs: openai.Int(2)})
	require.NoError(t, err)
	require.NotEmpty(t, lp.Choices[0].Logprobs.Content)
	for _, e := range lp.Choices[0].Logprobs.Content {
		require.Len(t, e.TopLogprobs, 2)
		require.InDelta(t, e.TopLogprobs[0].Logprob, e.Logprob, 1e-5, "greedy: the likeliest")
	}

	rs, err := cl.Responses.New(ctx, responses.ResponseNewParams{Model: "ls-tiny",
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Hello there")}, MaxOutputTokens: openai.Int(8), Temperature: openai.Float(0)})
	require.NoError(t, err)
	require.NotEmpty(t, rs.OutputText())
	require.EqualValues(t, 8, rs.Usage.OutputTokens)
	c.leave(w, id)
}
