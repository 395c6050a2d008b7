package engine_test

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"math"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/engine"
)

type embeddings struct {
	Data []struct {
		Embedding json.RawMessage `json:"embedding"`
		Index     int             `json:"index"`
		Object    string          `json:"object"`
	} `json:"data"`
	Usage struct {
		PromptTokens int `json:"prompt_tokens"`
		TotalTokens  int `json:"total_tokens"`
	} `json:"usage"`
}

func embed(t *testing.T, url, body string) embeddings {
	t.Helper()
	code, b := post(t, url+"/v1/embeddings", body)
	require.Equal(t, http.StatusOK, code, string(b))
	var e embeddings
	require.NoError(t, json.Unmarshal(b, &e), string(b))
	return e
}

func floats(t *testing.T, raw json.RawMessage) []float64 {
	t.Helper()
	var v []float64
	require.NoError(t, json.Unmarshal(raw, &v), string(raw))
	return v
}

// An engine started with --embeddings answers OpenAI's /v1/embeddings as
// llama-server does: mean-pooled, L2-normalized, one per input, in floats
// or base64; it refuses generations, and an engine without the flag
// refuses embeddings, both 501 as llama-server.
func TestEmbeddings(t *testing.T) {
	s := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 512, Parallel: 2, Embeddings: true})
	e := embed(t, s.URL(), `{"input":["the quick brown fox","hello"],"model":"x"}`)
	require.Len(t, e.Data, 2)
	a, b := floats(t, e.Data[0].Embedding), floats(t, e.Data[1].Embedding)
	var na, nb, dot float64
	for i := range a {
		na, nb, dot = na+a[i]*a[i], nb+b[i]*b[i], dot+a[i]*b[i]
	}
	assert.InDelta(t, 1, na, 1e-5, "unit length")
	assert.InDelta(t, 1, nb, 1e-5)
	assert.Less(t, dot, 0.9999, "different inputs, different embeddings")
	assert.Equal(t, 1, e.Data[1].Index)
	assert.Equal(t, "embedding", e.Data[0].Object)
	assert.Positive(t, e.Usage.PromptTokens)
	assert.Equal(t, e.Usage.PromptTokens, e.Usage.TotalTokens)

	again := embed(t, s.URL(), `{"input":"the quick brown fox","encoding_format":"base64"}`)
	var b64 string
	require.NoError(t, json.Unmarshal(again.Data[0].Embedding, &b64))
	raw, err := base64.StdEncoding.DecodeString(b64)
	require.NoError(t, err)
	require.Len(t, raw, 4*len(a))
	for i := range a {
		assert.InDelta(t, a[i], float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))), 1e-6, "the same input, the same embedding")
	}

	for body, want := range map[string]int{
		`{"input":[]}`:                           400,
		`{"input":3}`:                            400,
		`{"input":"x","encoding_format":"int8"}`: 400,
	} {
		code, b := post(t, s.URL()+"/v1/embeddings", body)
		assert.Equal(t, want, code, "%s: %s", body, b)
	}
	code, body := post(t, s.URL()+"/completion", `{"prompt":"x"}`)
	assert.Equal(t, http.StatusNotImplemented, code, string(body))
	assert.Contains(t, string(body), "not_supported_error")

	gen := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 256})
	code, body = post(t, gen.URL()+"/v1/embeddings", `{"input":"x"}`)
	assert.Equal(t, http.StatusNotImplemented, code, string(body))
}

// With LLORCH_LLAMA_SERVER: the built-in engine's embeddings are
// llama-server's (--embeddings --pooling mean) on the same model.
func TestEmbeddingsMatchLlamaServer(t *testing.T) {
	theirs := llamaServer(t, tinyModel(t), "--embeddings", "--pooling", "mean")
	s := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 256, Embeddings: true})
	body := `{"input":["the quick brown fox jumps over the lazy dog","hello"]}`
	ours, want := embed(t, s.URL(), body), embed(t, theirs, body)
	require.Len(t, want.Data, 2)
	assert.Equal(t, want.Usage.PromptTokens, ours.Usage.PromptTokens)
	for i := range want.Data {
		w, o := floats(t, want.Data[i].Embedding), floats(t, ours.Data[i].Embedding)
		require.Len(t, o, len(w))
		for j := range w {
			require.InDelta(t, w[j], o[j], 1e-3, "input %d, dimension %d", i, j)
		}
	}
}
