package engine_test

import (
	"encoding/json"
	"math"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/engine"
)

type tokenProb struct {
	ID      int32   `json:"id"`
	Token   string  `json:"token"`
	Bytes   []int   `json:"bytes"`
	Logprob float64 `json:"logprob"`
	Top     []struct {
		ID      int32   `json:"id"`
		Logprob float64 `json:"logprob"`
	} `json:"top_logprobs"`
}

// n_probs gives each sampled token's log probability and the most likely
// ones at its position, in llama-server's shape: under greedy sampling the
// token is the most likely one; the alternatives are sorted and their
// probabilities sum to at most 1; streamed, each event has one entry per
// token it carries.
func TestLogprobs(t *testing.T) {
	s := loadedEngine(t, engine.Options{Parallel: 1})
	code, raw := post(t, s.URL()+"/completion", `{"prompt":"Once upon a time","n_predict":12,"temperature":0,"return_tokens":true,"n_probs":5}`)
	require.Equal(t, http.StatusOK, code, string(raw))
	var c struct {
		Tokens []int32     `json:"tokens"`
		Probs  []tokenProb `json:"completion_probabilities"`
	}
	require.NoError(t, json.Unmarshal(raw, &c))
	require.Len(t, c.Probs, len(c.Tokens))
	for i, p := range c.Probs {
		require.Equal(t, c.Tokens[i], p.ID)
		require.Len(t, p.Top, 5)
		require.Equal(t, p.ID, p.Top[0].ID, "greedy: the most likely token")
		require.InDelta(t, p.Top[0].Logprob, p.Logprob, 1e-6)
		sum := 0.0
		for j, top := range p.Top {
			require.LessOrEqual(t, top.Logprob, 0.0)
			if j > 0 {
				require.LessOrEqual(t, top.Logprob, p.Top[j-1].Logprob)
			}
			sum += math.Exp(top.Logprob)
		}
		require.LessOrEqual(t, sum, 1.0+1e-5)
		require.NotEmpty(t, p.Bytes)
	}
	parts, final := stream(t, s, `{"prompt":"Once upon a time","n_predict":12,"temperature":0,"stream":true,"return_tokens":true,"n_probs":2}`)
	require.True(t, final.Stop)
	n := 0
	for _, part := range parts {
		n += len(part.Tokens)
		require.Len(t, part.Probs, len(part.Tokens))
	}
	require.Equal(t, len(c.Tokens), n)
	code, raw = post(t, s.URL()+"/completion", `{"prompt":"x","n_predict":2,"n_probs":21}`)
	require.Equal(t, http.StatusBadRequest, code, string(raw))
}
