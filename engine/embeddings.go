package engine

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/http"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// errNotSupported is llama-server's error type for a feature the server
// was not started for (HTTP 501).
const errNotSupported = "not_supported_error"

// embeddingsRequest is OpenAI's /v1/embeddings body, as llama-server reads it.
type embeddingsRequest struct {
	Input          json.RawMessage `json:"input"`
	Model          string          `json:"model"`
	EncodingFormat string          `json:"encoding_format"`
}

// parseInputs reads input: a string or an array of strings.
func parseInputs(raw json.RawMessage) ([]string, error) {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil || len(many) == 0 {
		return nil, fmt.Errorf("\"input\" must be a string or a non-empty array of strings")
	}
	return many, nil
}

// handleEmbeddings answers OpenAI's /v1/embeddings as llama-server does
// with --embeddings --pooling mean: each input's mean-pooled embedding,
// L2-normalized, as floats or base64 of little-endian float32.
func (s *Server) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	if !s.opts.Embeddings {
		writeError(w, http.StatusNotImplemented, errNotSupported, "This server does not support embeddings. Start it with `--embeddings`")
		return
	}
	var req embeddingsRequest
	if !decodeBody(w, r, &req) {
		return
	}
	inputs, err := parseInputs(req.Input)
	if err != nil {
		writeError(w, http.StatusBadRequest, errInvalidRequest, err.Error())
		return
	}
	switch req.EncodingFormat {
	case "", "float", "base64":
	default:
		writeError(w, http.StatusBadRequest, errInvalidRequest, fmt.Sprintf("\"encoding_format\" must be float or base64, not %q", req.EncodingFormat))
		return
	}
	data := make([]map[string]any, 0, len(inputs))
	total := 0
	for i, in := range inputs {
		v, n, err := s.embed(r, in)
		if err != nil {
			s.generationError(w, r, err, false)
			return
		}
		total += n
		var emb any = v
		if req.EncodingFormat == "base64" {
			b := make([]byte, 4*len(v))
			for j, x := range v {
				binary.LittleEndian.PutUint32(b[4*j:], math.Float32bits(x))
			}
			emb = base64.StdEncoding.EncodeToString(b)
		}
		data = append(data, map[string]any{"embedding": emb, "index": i, "object": "embedding"})
	}
	writeJSON(w, http.StatusOK, map[string]any{"model": s.modelName(), "object": "list", "data": data,
		"usage": map[string]any{"prompt_tokens": total, "total_tokens": total}})
}

// embed runs one input on a free slot: its embedding and its tokens.
func (s *Server) embed(r *http.Request, text string) ([]float32, int, error) {
	toks, err := s.tokens(promptInput{Text: text})
	if err != nil {
		return nil, 0, err
	}
	// One decode: a pooled embedding is of one physical batch.
	if len(toks) > s.ubatch {
		return nil, 0, &requestError{fmt.Sprintf("input is too large to process. increase the physical batch size (%d tokens, the batch holds %d)", len(toks), s.ubatch)}
	}
	sl, done, err := s.hold(r.Context(), -1, toks)
	if err != nil {
		return nil, 0, err
	}
	defer done()
	v, err := sl.embed(toks, s.nEmbd)
	if err == nil {
		s.promptTokens.Add(int64(len(toks)))
	}
	return v, len(toks), err
}

// embed decodes tokens from an empty cache and returns their mean-pooled
// embedding, L2-normalized (llama-server's default embd_normalize).
func (s *slot) embed(tokens []llama.Token, nEmbd int) ([]float32, error) {
	s.cached = nil // the memory is cleared and then holds no prompt to reuse
	mem, err := llama.GetMemory(s.ctx)
	if err != nil {
		return nil, err
	}
	if err := llama.MemoryClear(mem, true); err != nil {
		return nil, err
	}
	if rc, err := llama.Decode(s.ctx, llama.BatchGetOne(tokens)); err != nil || rc != 0 {
		return nil, fmt.Errorf("decoding the input: llama_decode returned %d (%v)", rc, err)
	}
	pooled, err := llama.GetEmbeddingsSeq(s.ctx, 0, int32(nEmbd))
	if err != nil || pooled == nil {
		return nil, fmt.Errorf("reading the pooled embedding: %v", err)
	}
	out := make([]float32, nEmbd)
	var norm float64
	for i, x := range pooled {
		out[i] = x
		norm += float64(x) * float64(x)
	}
	if norm > 0 {
		inv := float32(1 / math.Sqrt(norm))
		for i := range out {
			out[i] *= inv
		}
	}
	return out, nil
}

// noCompletions refuses generations on an embeddings engine, as
// llama-server started with --embeddings does.
func (s *Server) noCompletions(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.opts.Embeddings {
			writeError(w, http.StatusNotImplemented, errNotSupported, "This server does not support completions. Start it without `--embeddings`")
			return
		}
		h(w, r)
	}
}
