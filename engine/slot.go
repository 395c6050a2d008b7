package engine

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// Stop reasons, spelled as llama-server's stop_type.
const (
	StopLimit = "limit"
	StopEOS   = "eos"
	StopWord  = "word"
)

// sampling is one request's generation settings, after defaults.
type sampling struct {
	NPredict    int
	Temperature float64
	TopK        int
	TopP        float64
	Seed        int64
	Stop        []string
	LogitBias   []llama.LogitBias
	Grammar     string // GBNF whose root rule the output must match
	NProbs      int    // > 0: each token's log probability and this many alternatives
}

// promptInput is text to tokenize, or tokens as they are (llama-server's
// token-array prompt; a continued generation sends its prompt's and its
// already produced tokens, so it resumes exactly where it stopped).
type promptInput struct {
	Text   string
	Tokens []llama.Token
	// ResumeAt (with Tokens): the tokens from this index on were generated
	// before; they are decoded one at a time, as they were when sampled, so
	// the cache and the next logits are bit for bit the uninterrupted
	// run's (a batched decode rounds differently and greedy output can
	// drift).
	ResumeAt int
	// CachePrompt reuses the longest prefix of the prompt the slot's cache
	// holds from its last request, decoding only the rest (llama-server's
	// cache_prompt). A resumed generation never does: its prompt must be
	// decoded as it first was.
	CachePrompt bool
	// Slot is the slot to run on (llama-server's id_slot); -1: the idle one
	// whose cache shares the longest prefix with the prompt.
	Slot int
}

// outcome is what a finished generation reports.
type outcome struct {
	Content      string
	Predicted    int
	Evaluated    int
	Cached       int // prompt tokens reused from the slot's cache
	Slot         int // the slot it ran on
	Held         int // tokens the slot's cache holds after it (llama-server's tokens_cached)
	StopType     string
	StoppingWord string
	PromptMs     float64
	PredictedMs  float64
}

// requestError is a client error (HTTP 400), like llama-server's
// invalid_request_error.
type requestError struct{ msg string }

func (e *requestError) Error() string { return e.msg }

// slot is one llama context: one generation at a time.
type slot struct {
	id     int
	ctx    llama.Context
	vocab  llama.Vocab
	nCtx   int
	busy   atomic.Bool
	taskID atomic.Int64
	// Guarded by the server's slotMu while idle; the generation owns them
	// while busy.
	cached   []llama.Token // the tokens the context's memory holds, from position 0
	lastUsed uint64        // when it was last released (a counter): LRU order
}

// commonPrefix is the length of the prefix a and b share.
func commonPrefix(a, b []llama.Token) int {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

// emitted is one piece of a generation's output: text as it became final
// (whole UTF-8 characters, never part of a stop word), the tokens sampled
// since the last piece and, when the request asked (n_probs), their
// probabilities (else nil); Evaluated is the prompt's length in tokens.
type emitted struct {
	Text      string
	Tokens    []llama.Token
	Probs     []tokenProbs
	Evaluated int
}

type emitFunc func(emitted) error

// generate runs one completion on the slot, handing its output to emit; an
// emit error (the client went away) or ctx ending stops generation.
func (s *slot) generate(ctx context.Context, in promptInput, p sampling, emit emitFunc) (outcome, error) {
	var out outcome
	mem, err := llama.GetMemory(s.ctx)
	if err != nil {
		return out, err
	}
	tokens := in.Tokens // run tokenized and checked them
	out.Evaluated = len(tokens)
	// Keep the longest prefix the cache shares with the prompt; anything
	// else (no reuse asked, or a resume) starts from an empty cache, so no
	// state leaks from one request into the next. At least the prompt's
	// last token is decoded again: its logits are the first sample's.
	keep := 0
	if in.CachePrompt && in.ResumeAt == 0 {
		keep = min(commonPrefix(s.cached, tokens), len(tokens)-1)
	}
	if keep > 0 {
		if ok, err := llama.MemorySeqRm(mem, 0, llama.Pos(keep), -1); err != nil || !ok {
			keep = 0
		}
	}
	if keep == 0 {
		if err := llama.MemoryClear(mem, true); err != nil {
			s.cached = nil
			return out, err
		}
	}
	out.Cached = keep
	// s.cached follows what the memory holds as decoding goes on; a failed
	// decode leaves it unknown (nil), and the next request clears it.
	s.cached = s.cached[:keep]
	nVocab := llama.VocabNTokens(s.vocab)

	chain := llama.SamplerChainInit(llama.SamplerChainDefaultParams())
	defer llama.SamplerFree(chain)
	if len(p.LogitBias) > 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitLogitBias(nVocab, int32(len(p.LogitBias)), &p.LogitBias[0]))
	}
	if p.Grammar != "" {
		g := llama.SamplerInitGrammar(s.vocab, p.Grammar, "root")
		if g == 0 {
			return out, &requestError{"the grammar does not parse (GBNF with a root rule)"}
		}
		llama.SamplerChainAdd(chain, g) // the chain owns it
	}
	if p.Temperature <= 0 {
		llama.SamplerChainAdd(chain, llama.SamplerInitGreedy())
	} else {
		if p.TopK > 0 {
			llama.SamplerChainAdd(chain, llama.SamplerInitTopK(int32(p.TopK)))
		}
		if p.TopP < 1 {
			llama.SamplerChainAdd(chain, llama.SamplerInitTopP(float32(p.TopP), 1))
		}
		llama.SamplerChainAdd(chain, llama.SamplerInitTemp(float32(p.Temperature)))
		seed := uint32(llama.DefaultSeed) // llama.cpp draws a random seed for this value
		if p.Seed >= 0 {
			seed = uint32(p.Seed)
		}
		llama.SamplerChainAdd(chain, llama.SamplerInitDist(seed))
	}

	start := time.Now()
	batchSize := int(llama.NBatch(s.ctx))
	resumeAt := len(tokens)
	if in.ResumeAt > 0 && in.ResumeAt < len(tokens) {
		resumeAt = in.ResumeAt
	}
	for i := keep; i < len(tokens); {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		end := min(i+batchSize, resumeAt)
		if i >= resumeAt {
			end = i + 1
		}
		if rc, err := llama.Decode(s.ctx, llama.BatchGetOne(tokens[i:end])); err != nil || rc != 0 {
			s.cached = nil
			return out, fmt.Errorf("decoding the prompt: llama_decode returned %d (%v)", rc, err)
		}
		s.cached = append(s.cached, tokens[i:end]...)
		i = end
	}
	// The produced tokens of a resumed generation move the grammar (and
	// any sampler with state) on as their sampling did.
	for _, t := range tokens[resumeAt:] {
		llama.SamplerAccept(chain, t)
	}
	genStart := time.Now()
	out.PromptMs = float64(genStart.Sub(start).Microseconds()) / 1000

	var (
		text     []byte // everything generated so far
		sent     int    // bytes of text already handed to emit
		piece    = make([]byte, 256)
		nPast    = len(tokens)
		maxStop  int
		tokenBuf = []llama.Token{0}
		pending  []llama.Token // sampled, not yet handed to emit
		probs    []tokenProbs  // theirs, when asked
	)
	for _, w := range p.Stop {
		maxStop = max(maxStop, len(w))
	}
	out.StopType = StopLimit
	for p.NPredict < 0 || out.Predicted < p.NPredict {
		if nPast >= s.nCtx {
			break // context full: llama-server would shift; we stop at the limit
		}
		if err := ctx.Err(); err != nil {
			return out, err
		}
		tok := llama.SamplerSample(chain, s.ctx, -1)
		out.Predicted++
		pending = append(pending, tok)
		if p.NProbs > 0 {
			logits, err := llama.GetLogitsIth(s.ctx, -1, int(nVocab))
			if err != nil || logits == nil {
				return out, fmt.Errorf("reading the logits of token %d: %v", out.Predicted, err)
			}
			probs = append(probs, logprobs(logits, tok, p.NProbs))
		}
		if llama.VocabIsEOG(s.vocab, tok) {
			out.StopType = StopEOS
			break
		}
		n := llama.TokenToPiece(s.vocab, tok, piece, 0, false)
		if n < 0 {
			piece = make([]byte, -n)
			n = llama.TokenToPiece(s.vocab, tok, piece, 0, false)
		}
		text = append(text, piece[:max(n, 0)]...)

		if maxStop > 0 {
			if at, word := findStop(text[sent:], p.Stop); at >= 0 {
				text = text[:sent+at]
				out.StopType, out.StoppingWord = StopWord, word
				break
			}
		}
		// Hold back a possible start of a stop word and a split UTF-8
		// character: neither may reach the client yet.
		ready := len(text) - partialStop(text, p.Stop)
		ready = sent + completeUTF8(text[sent:ready])
		if ready > sent {
			if err := emit(emitted{string(text[sent:ready]), pending, probs, out.Evaluated}); err != nil {
				return out, err
			}
			sent, pending, probs = ready, nil, nil
		}

		tokenBuf[0] = tok
		if rc, err := llama.Decode(s.ctx, llama.BatchGetOne(tokenBuf)); err != nil || rc != 0 {
			s.cached = nil
			return out, fmt.Errorf("decoding token %d: llama_decode returned %d (%v)", out.Predicted, rc, err)
		}
		s.cached = append(s.cached, tok)
		nPast++
	}
	if sent < len(text) || len(pending) > 0 {
		if err := emit(emitted{string(text[sent:]), pending, probs, out.Evaluated}); err != nil {
			return out, err
		}
	}
	out.Content = strings.ToValidUTF8(string(text), "\uFFFD")
	out.PredictedMs = float64(time.Since(genStart).Microseconds()) / 1000
	return out, nil
}

// findStop returns the earliest position of any stop word in b, and the word.
func findStop(b []byte, stops []string) (int, string) {
	at, word := -1, ""
	for _, w := range stops {
		if w == "" {
			continue
		}
		if i := strings.Index(string(b), w); i >= 0 && (at < 0 || i < at) {
			at, word = i, w
		}
	}
	return at, word
}

// partialStop is the length of the longest suffix of b that begins a stop word.
func partialStop(b []byte, stops []string) int {
	best := 0
	for _, w := range stops {
		for l := min(len(w)-1, len(b)); l > best; l-- {
			if strings.HasSuffix(string(b), w[:l]) {
				best = l
				break
			}
		}
	}
	return best
}

// completeUTF8 is the length of b without a trailing, still incomplete
// multi-byte character.
func completeUTF8(b []byte) int {
	for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax; i-- {
		c := b[i]
		if c < utf8.RuneSelf {
			return len(b)
		}
		if utf8.RuneStart(c) {
			if utf8.FullRune(b[i:]) {
				return len(b)
			}
			return i
		}
	}
	return len(b)
}
