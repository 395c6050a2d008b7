package protocol

import "encoding/json"

// Props is the part of GET /props llorch reads.
type Props struct {
	TotalSlots int    `json:"total_slots"`
	BuildInfo  string `json:"build_info"`
}

// Slot is the part of a GET /slots entry llorch reads.
type Slot struct {
	ID           int  `json:"id"`
	IsProcessing bool `json:"is_processing"`
}

// TokenizeRequest is the body of POST /tokenize.
type TokenizeRequest struct {
	Content    string `json:"content"`
	AddSpecial bool   `json:"add_special"`
}

// TokenizeResponse is what POST /tokenize answers.
type TokenizeResponse struct {
	Tokens []int32 `json:"tokens"`
}

// Message is one chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// ApplyTemplateRequest is the body of POST /apply-template.
type ApplyTemplateRequest struct {
	Messages []Message `json:"messages"`
}

// ApplyTemplateResponse is what POST /apply-template answers: the prompt
// the chat template renders from the messages.
type ApplyTemplateResponse struct {
	Prompt string `json:"prompt"`
}

// CompletionRequest is the body of POST /completion as llorch sends it,
// streamed back with the token ids.
type CompletionRequest struct {
	Prompt       Prompt   `json:"prompt"`
	NPredict     int      `json:"n_predict"`
	Temperature  float64  `json:"temperature"`
	TopK         int      `json:"top_k"`
	TopP         float64  `json:"top_p"`
	Seed         int64    `json:"seed"`
	Stop         []string `json:"stop"`
	Stream       bool     `json:"stream"`
	ReturnTokens bool     `json:"return_tokens"`
	Grammar      string   `json:"grammar,omitempty"` // GBNF
	NProbs       int      `json:"n_probs,omitempty"` // log probabilities, with this many alternatives
	// ResumeAt is llorch's: where a resumed generation's own tokens start
	// in Prompt. llama-server ignores it.
	ResumeAt int `json:"resume_at,omitempty"`
	// CachePrompt reuses the prefix the slot's cache shares with the prompt
	// (llama-server's default is true). IDSlot runs it on that slot (nil:
	// the engine picks one).
	CachePrompt bool `json:"cache_prompt"`
	IDSlot      *int `json:"id_slot,omitempty"`
}

// Prompt is a completion's prompt: text the engine tokenizes (with its
// special tokens, as /tokenize with add_special), or token ids as they
// are when Tokens is not nil.
type Prompt struct {
	Text   string
	Tokens []int32
}

// MarshalJSON writes the prompt as llama-server reads it: a string or an
// array of token ids.
func (p Prompt) MarshalJSON() ([]byte, error) {
	if p.Tokens != nil {
		return json.Marshal(p.Tokens)
	}
	return json.Marshal(p.Text)
}

// Chunk is one event of the /completion stream.
type Chunk struct {
	Content         string  `json:"content"`
	Tokens          []int32 `json:"tokens"`
	Stop            bool    `json:"stop"`
	StopType        string  `json:"stop_type"`
	TokensEvaluated int     `json:"tokens_evaluated"` // the prompt's tokens, in the final event
	IDSlot          int     `json:"id_slot"`          // the slot it ran on, in the final event
	// Probs are the tokens' log probabilities (n_probs), one per token.
	Probs   []TokenProb `json:"completion_probabilities"`
	Timings struct {
		CacheN      int     `json:"cache_n"` // prompt tokens reused from the slot's cache
		PredictedMs float64 `json:"predicted_ms"`
	} `json:"timings"`
	Error *Error `json:"error"`
}

// TokenProb is a token's log probability, as llama-server reports it.
type TokenProb struct {
	ID      int32       `json:"id"`
	Token   string      `json:"token"`
	Bytes   []int       `json:"bytes"`
	Logprob float32     `json:"logprob"`
	Top     []TokenProb `json:"top_logprobs"`
}

// ErrorBody is llama-server's error answer, and the event a stream ends
// with when the generation fails.
type ErrorBody struct {
	Error Error `json:"error"`
}

// Error is the error inside an ErrorBody. Its fields stand in the order
// the keys sort in, as in ErrorBody's bytes from a map.
type Error struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Type    string `json:"type"`
}
