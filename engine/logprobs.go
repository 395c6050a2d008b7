package engine

import (
	"container/heap"
	"math"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// MaxProbs bounds n_probs: the alternatives reported per token (OpenAI's
// top_logprobs goes to 20).
const MaxProbs = 20

// tokenProbs is a sampled token's log probability under the model (before
// sampling: temperature, top-k, grammar and bias do not change it, as in
// llama-server) and the n most likely tokens at its position.
type tokenProbs struct {
	Logprob float32
	Top     []tokenProb
}

type tokenProb struct {
	Token   llama.Token
	Logprob float32
}

// logprobs reads them from the position's logits.
func logprobs(logits []float32, tok llama.Token, n int) tokenProbs {
	maxLogit := float32(math.Inf(-1))
	for _, v := range logits {
		maxLogit = max(maxLogit, v)
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v - maxLogit))
	}
	lse := float64(maxLogit) + math.Log(sum)
	out := tokenProbs{Logprob: float32(float64(logits[tok]) - lse)}
	if n <= 0 {
		return out
	}
	h := &minProbs{}
	for i, v := range logits {
		if h.Len() < n {
			heap.Push(h, tokenProb{llama.Token(i), v})
		} else if v > (*h)[0].Logprob {
			(*h)[0] = tokenProb{llama.Token(i), v}
			heap.Fix(h, 0)
		}
	}
	out.Top = make([]tokenProb, h.Len())
	for i := len(out.Top) - 1; i >= 0; i-- {
		p := heap.Pop(h).(tokenProb)
		p.Logprob = float32(float64(p.Logprob) - lse)
		out.Top[i] = p
	}
	return out
}

// minProbs is a min-heap by logit: the n best seen so far.
type minProbs []tokenProb

func (h minProbs) Len() int { return len(h) }
func (h minProbs) Less(i, j int) bool {
	if h[i].Logprob != h[j].Logprob {
		return h[i].Logprob < h[j].Logprob
	}
	return h[i].Token > h[j].Token // equal logits: the lower id ranks first
}
func (h minProbs) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *minProbs) Push(x any)   { *h = append(*h, x.(tokenProb)) }
func (h *minProbs) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// probsJSON is llama-server's completion_probabilities of toks: per token
// its id, text (the valid UTF-8 part), bytes and logprob, and its
// top_logprobs alike.
func (s *Server) probsJSON(toks []llama.Token, probs []tokenProbs) []map[string]any {
	out := make([]map[string]any, 0, len(probs))
	for i, p := range probs {
		top := make([]map[string]any, len(p.Top))
		for j, t := range p.Top {
			top[j] = s.probJSON(t.Token, t.Logprob)
		}
		e := s.probJSON(toks[i], p.Logprob)
		e["top_logprobs"] = top
		out = append(out, e)
	}
	return out
}

func (s *Server) probJSON(tok llama.Token, logprob float32) map[string]any {
	piece := make([]byte, 64)
	n := llama.TokenToPiece(s.vocab, tok, piece, 0, false)
	if n < 0 {
		piece = make([]byte, -n)
		n = llama.TokenToPiece(s.vocab, tok, piece, 0, false)
	}
	b := piece[:max(n, 0)]
	bytes := make([]int, len(b))
	for i, c := range b {
		bytes[i] = int(c)
	}
	return map[string]any{"id": int32(tok), "token": string(b[:completeUTF8(b)]), "bytes": bytes, "logprob": logprob}
}
