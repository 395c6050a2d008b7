package protocol_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/engine/protocol"
)

type answer struct {
	code int
	body string
}

// engineAt answers each "METHOD /path" with its canned status and body, and
// records the request bodies it gets.
func engineAt(t *testing.T, answers map[string]answer) (protocol.Client, func(string) string) {
	t.Helper()
	var mu sync.Mutex
	bodies := map[string]string{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies[r.Method+" "+r.URL.Path] = string(b)
		mu.Unlock()
		a, ok := answers[r.Method+" "+r.URL.Path]
		if !ok {
			a.code, a.body = http.StatusNotFound, "not here"
		}
		w.WriteHeader(a.code)
		fmt.Fprint(w, a.body)
	}))
	t.Cleanup(srv.Close)
	return protocol.Client{URL: srv.URL}, func(req string) string {
		mu.Lock()
		defer mu.Unlock()
		return bodies[req]
	}
}

func TestClientReads(t *testing.T) {
	ctx := context.Background()
	eng, got := engineAt(t, map[string]answer{
		"GET /health":          {503, `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`},
		"GET /props":           {200, `{"total_slots":2,"build_info":"b1","model_path":"m"}`},
		"GET /slots":           {200, `[{"id":0,"is_processing":true,"n_ctx":128},{"id":1,"is_processing":false}]`},
		"POST /tokenize":       {200, `{"tokens":[1,2,3]}`},
		"POST /apply-template": {400, " no template \n"},
	})
	code, err := eng.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, 503, code)

	props, err := eng.Props(ctx)
	require.NoError(t, err)
	assert.Equal(t, protocol.Props{TotalSlots: 2, BuildInfo: "b1"}, props)

	slots, err := eng.Slots(ctx)
	require.NoError(t, err)
	assert.Equal(t, []protocol.Slot{{ID: 0, IsProcessing: true}, {ID: 1}}, slots)

	toks, err := eng.Tokenize(ctx, protocol.TokenizeRequest{Content: "hi", AddSpecial: true})
	require.NoError(t, err)
	assert.Equal(t, []int32{1, 2, 3}, toks)
	assert.JSONEq(t, `{"content":"hi","add_special":true}`, got("POST /tokenize"))

	_, err = eng.ApplyTemplate(ctx, []protocol.Message{{Role: "user", Content: "hi"}})
	var status *protocol.StatusError
	require.ErrorAs(t, err, &status)
	assert.Equal(t, 400, status.Code)
	assert.Equal(t, eng.URL+"/apply-template answered 400: no template", err.Error())
	assert.JSONEq(t, `{"messages":[{"role":"user","content":"hi"}]}`, got("POST /apply-template"))

	_, err = protocol.Client{URL: eng.URL + "/nowhere"}.Props(ctx)
	assert.EqualError(t, err, "status 404")
}

func TestClientStream(t *testing.T) {
	ctx := context.Background()
	eng, got := engineAt(t, map[string]answer{
		"POST /completion": {200, ": keep-alive\n\ndata: {\"content\":\"a\",\"tokens\":[5]}\n\n" +
			"data: {\"content\":\"\",\"stop\":true,\"stop_type\":\"limit\",\"timings\":{\"predicted_ms\":3.5}}\n\ndata: {oops\n\n"},
	})
	s, err := eng.Complete(ctx, protocol.CompletionRequest{Prompt: protocol.Prompt{Tokens: []int32{1}}, NPredict: 4, Stream: true, ReturnTokens: true})
	require.NoError(t, err)
	defer s.Close()
	assert.JSONEq(t, `{"prompt":[1],"n_predict":4,"temperature":0,"top_k":0,"top_p":0,"seed":0,"stop":null,
		"stream":true,"return_tokens":true,"cache_prompt":false}`, got("POST /completion"), "resume_at only on a resume, id_slot only when chosen; cache_prompt always (llama-server's default is true)")
	ch, err := s.Next()
	require.NoError(t, err)
	assert.Equal(t, "a", ch.Content)
	assert.Equal(t, []int32{5}, ch.Tokens)
	ch, err = s.Next()
	require.NoError(t, err)
	assert.True(t, ch.Stop)
	assert.Equal(t, "limit", ch.StopType)
	assert.Equal(t, 3.5, ch.Timings.PredictedMs)
	_, err = s.Next()
	var bad *protocol.EventError
	require.ErrorAs(t, err, &bad)
	_, err = s.Next()
	assert.Equal(t, io.EOF, err)

	refused, _ := engineAt(t, map[string]answer{"POST /completion": {400, `{"error":{"code":400}}`}})
	_, err = refused.Complete(ctx, protocol.CompletionRequest{})
	var status *protocol.StatusError
	require.True(t, errors.As(err, &status))
	assert.Equal(t, `{"error":{"code":400}}`, string(status.Body))
}
