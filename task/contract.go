// Package task is the contract of inference tasks: ids, requests, events
// and results shared by the API, the task workflow and the node's
// generation activity.
package task

import (
	"encoding/json"
	"fmt"
	"regexp"
	"time"

	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/apikey"
)

// WorkflowType is the registered name of the task workflow.
const WorkflowType = "Task"

// The search attributes of a task's workflow (Keyword): its end state
// (Completed, Failed, Canceled; a running one has none), the API key that
// submitted it and its session. GET /v2/tasks filters on them.
var (
	StateKey   = temporal.NewSearchAttributeKeyKeyword("TaskState")
	OwnerKey   = temporal.NewSearchAttributeKeyKeyword("TaskOwner")
	SessionKey = temporal.NewSearchAttributeKeyKeyword("SessionId")
)

// WorkflowID is the readable id of a task's workflow.
func WorkflowID(taskID string) string { return "task:" + taskID }

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidateID checks a client-chosen task id.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("task id %q is invalid: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit", id)
	}
	return nil
}

// Priority orders the admission queue: interactive before batch.
type Priority string

const (
	Interactive Priority = "interactive"
	Batch       Priority = "batch"
)

// Placement says where a task may run (the original plan's placement object).
type Placement struct {
	Mode          string   `json:"mode,omitempty"` // auto (default), pin, prefer
	PinPoolID     string   `json:"pin_pool_id,omitempty"`
	PreferPools   []string `json:"prefer_pools,omitempty"`
	AvoidPools    []string `json:"avoid_pools,omitempty"`
	NodeID        string   `json:"node_id,omitempty"`
	AllowFallback *bool    `json:"allow_fallback,omitempty"` // prefer: may run elsewhere (default true)
	// Engine: only pools of this engine ("builtin", "llama-server"; "" or
	// "llamacpp": any llama.cpp pool, which every pool is).
	Engine string `json:"engine,omitempty"`
	// MinCtx: only pools whose slots hold at least this many tokens.
	MinCtx int `json:"min_ctx,omitempty"`
	// KVHint: KVReuse ("", the default) places the task on the pool, and
	// runs it on the slot, whose cache holds the longest prefix of its
	// prompt; KVCold places by load alone and decodes the whole prompt.
	KVHint string `json:"kv_hint,omitempty"`
}

// KV hints (the original contract's kv_hint).
const (
	KVReuse = "reuse"
	KVCold  = "cold"
)

// EngineAny is the engine constraint every pool meets: both engines run
// llama.cpp.
const EngineAny = "llamacpp"

// Message is one chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Params are the sampling settings, as the engine takes them.
type Params struct {
	MaxTokens   int      `json:"max_tokens"`
	Temperature float64  `json:"temperature"`
	TopK        int      `json:"top_k"`
	TopP        float64  `json:"top_p"`
	Seed        int64    `json:"seed"`
	Stop        []string `json:"stop,omitempty"`
	// Grammar (GBNF, root rule "root") holds the output to what it
	// matches: JSON output is a grammar made from a schema (package
	// grammar). Both engines take it in /completion.
	Grammar string `json:"grammar,omitempty"`
	// Logprobs asks each token's log probability, with TopLogprobs (0-20)
	// of the most likely tokens at its position (Event.LP).
	Logprobs    bool `json:"logprobs,omitempty"`
	TopLogprobs int  `json:"top_logprobs,omitempty"`
}

// MaxTopLogprobs bounds Params.TopLogprobs, as OpenAI does.
const MaxTopLogprobs = 20

// Request is a task as admitted: the workflow's input.
type Request struct {
	TaskID        string        `json:"task_id"`
	SessionID     string        `json:"session_id,omitempty"`
	ModelID       string        `json:"model_id"`
	Prompt        string        `json:"prompt,omitempty"`
	Messages      []Message     `json:"messages,omitempty"`
	Params        Params        `json:"params"`
	Priority      Priority      `json:"priority"`
	Deadline      time.Duration `json:"deadline"` // 0: none
	Placement     Placement     `json:"placement"`
	CorrelationID string        `json:"correlation_id,omitempty"`
	EnqueuedAt    time.Time     `json:"enqueued_at"`
	// Owner is the id of the API key that submitted the task: a key that
	// is not admin sees its own tasks only. "" (a task of an older
	// release): the bootstrap key's.
	Owner string `json:"owner,omitempty"`
	// Indexed: the namespace has the task search attributes (StateKey,
	// OwnerKey, SessionKey); the workflow records its end state in
	// StateKey, so lists can filter on it.
	Indexed bool `json:"indexed,omitempty"`
	// Sink is where the node pushes the task's events (the apiserver that
	// admitted it), and the credential it pushes with.
	Sink Sink `json:"sink"`
	// QuotaKey is the API key whose quota admitted the task (quota:<key>
	// is told its end); "" for a key without limits.
	QuotaKey string `json:"quota_key,omitempty"`
	// FastStart is the granted slot whose node the admitting replica sent
	// the generation to over the node link while this workflow started
	// (the fast path, --fast-start): the workflow's first generation runs
	// there, and its Generate activity attaches to the generation already
	// running. nil: none was sent.
	FastStart *Where `json:"fast_start,omitempty"`
}

// Sink is the token stream's receiving end.
type Sink struct {
	URL   string `json:"url"`
	Token string `json:"token,omitempty"`
}

// Where is the pool a task runs on.
type Where struct {
	NodeID string `json:"node_id"`
	PoolID string `json:"pool_id"`
	URL    string `json:"url"`
	Epoch  int64  `json:"epoch"`
}

// State of a task.
type State string

const (
	Queued    State = "Queued"
	Running   State = "Running"
	Completed State = "Completed"
	Failed    State = "Failed"
	Canceled  State = "Canceled"
)

// Migration records a generation moved off a lost node.
type Migration struct {
	From    Where     `json:"from"`
	To      Where     `json:"to,omitempty"`
	AtToken int       `json:"at_token"`
	Reason  string    `json:"reason"`
	At      time.Time `json:"at"`
}

// Status is a task as a reader sees it.
type Status struct {
	TaskID        string      `json:"task_id"`
	State         State       `json:"state"`
	ModelID       string      `json:"model_id"`
	Where         *Where      `json:"where,omitempty"`
	Text          string      `json:"text,omitempty"`
	Pieces        []string    `json:"pieces,omitempty"` // token texts, to replay a finished stream
	TokensIn      int         `json:"tokens_in"`
	TokensCached  int         `json:"tokens_cached,omitempty"` // of TokensIn, reused from a slot's cache
	TokensOut     int         `json:"tokens_out"`
	StopType      string      `json:"stop_type,omitempty"`
	QueueMs       int64       `json:"queue_ms"`
	FirstTokenMs  int64       `json:"first_token_ms,omitempty"`
	DecodeMs      int64       `json:"decode_ms,omitempty"`
	Migrations    []Migration `json:"migrations,omitempty"`
	Error         *Error      `json:"error,omitempty"`
	CorrelationID string      `json:"correlation_id,omitempty"`
	Owner         string      `json:"owner,omitempty"` // the submitting key's id (Request.Owner)
	SubmittedAt   time.Time   `json:"submitted_at"`
	FinishedAt    time.Time   `json:"finished_at,omitempty"`
	// Output: the text and pieces are in the bucket (an output above the
	// node's inline bound); control.Tasks reads them back into Text and
	// Pieces, so readers of a Status never see it set.
	Output *OutputRef `json:"output,omitempty"`
}

// Error is a task's failure, as the error event and the API carry it.
type Error struct {
	Code         string `json:"code"`
	Message      string `json:"message"`
	Retriable    bool   `json:"retriable"`
	RetryAfterMs int64  `json:"retry_after_ms,omitempty"`
}

// Error makes a task's failure an error too (an output that cannot be
// read back is one, for the readers of control.Tasks).
func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Error codes of tasks.
const (
	ErrPoolUnavailable = "POOL_UNAVAILABLE"
	ErrWorkerReset     = "WORKER_RESET"
	ErrDeadline        = "DEADLINE_EXCEEDED"
	ErrCanceled        = "CANCELED"
	ErrEngine          = "ENGINE_ERROR"
	ErrAdmissionReject = "ADMISSION_REJECT"
	ErrModelDeprecated = "MODEL_DEPRECATED"
	// ErrSlotRefused: the node would not queue the generation for the
	// pool it was placed on (it runs no such engine now, or the engine's
	// queue is full); the task workflow places it again.
	ErrSlotRefused = "SLOT_REFUSED"
	// ErrOutputExpired: the task's output was in the bucket and is gone
	// (deleted after the output retention).
	ErrOutputExpired = "OUTPUT_EXPIRED"
	// ErrOutputCorrupt: the task's output in the bucket does not match the
	// checksum its history records, or does not decrypt: refused, never
	// served as the task's text.
	ErrOutputCorrupt = "OUTPUT_CORRUPT"
	// ErrOutputUnstored: the output was above the node's inline bound and
	// the bucket would not take it; the task fails (retry it).
	ErrOutputUnstored = "OUTPUT_UNSTORED"
)

// Workflow messages.
const (
	QueryStatus  = "status"
	SignalCancel = "cancel"
	// SignalSeen carries a Progress: the tokens an apiserver replica's
	// readers had when the generating node's link broke off. A generation
	// moved off a lost node resumes from the longest of these and its last
	// heartbeat, so no client sees text change under it.
	SignalSeen = "seen"
)

// Result is what one generation on one node produced.
type Result struct {
	Tokens       []int32  `json:"tokens"` // every token produced, resumed ones included
	Pieces       []string `json:"pieces"` // text per token, in order
	TokensIn     int      `json:"tokens_in"`
	StopType     string   `json:"stop_type"`
	FirstTokenMs int64    `json:"first_token_ms"`
	DecodeMs     int64    `json:"decode_ms"`
	// WaitMs is how long the generation waited at the node for a slot
	// (0 in histories from before node-side slots).
	WaitMs int64 `json:"wait_ms,omitempty"`
	// TokensCached is the prompt's tokens the engine reused from the slot's
	// cache (kv_hint reuse) rather than decoding them.
	TokensCached int `json:"tokens_cached,omitempty"`
	// Output, when set, holds Tokens and Pieces instead (they are empty):
	// an output above the node's inline bound is written to the bucket, as
	// a payload past Temporal's limit (2 MiB) would fail the task.
	Output *OutputRef `json:"output,omitempty"`
}

// OutputRef is where a generation's output is in the bucket: the object's
// key, its size and the SHA-256 of its bytes, which every read checks (the
// history, not the bucket, is the record).
type OutputRef struct {
	Key    string `json:"key"`
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
	// Tokens is how many tokens it holds (TokensOut without reading it).
	Tokens int `json:"tokens"`
}

// Output is what an offloaded output object holds.
type Output struct {
	Tokens []int32  `json:"tokens"`
	Pieces []string `json:"pieces"`
}

// Progress is what a generation has produced: the tokens a replica's
// readers saw (SignalSeen), those a generation that broke off with its
// worker alive hands back (WORKER_RESET's details), a resume point. The
// generation's heartbeat carries Produced alone, a count: a heartbeat
// holding every token so far made the traffic grow with the square of the
// output's length. Heartbeats recorded before carry Tokens and Pieces, and
// a move still resumes from them.
type Progress struct {
	Tokens []int32  `json:"tokens"`
	Pieces []string `json:"pieces"`
	// Produced is how many tokens the generation has (heartbeats).
	Produced int `json:"produced,omitempty"`
	// TokensIn is the prompt's length in tokens, once the engine told
	// (heartbeats, a reset's details): a move needs a slot that holds it
	// and max_tokens.
	TokensIn int `json:"tokens_in,omitempty"`
}

// Event is one event of a task's stream, as the node pushes it and as SSE
// carries it (type is the SSE event name).
type Event struct {
	Type string `json:"type"` // started, token, metrics, end, error
	// token: index, text, and the engine's token id (a resumed generation
	// continues from the ids the client has seen)
	I   int    `json:"i"`
	T   string `json:"t"`
	Tok int32  `json:"tok"`
	// started
	NodeID string `json:"node_id,omitempty"`
	PoolID string `json:"pool_id,omitempty"`
	// end
	TokensOut    int    `json:"tokens_out,omitempty"`
	DecodeTimeMs int64  `json:"decode_time_ms,omitempty"`
	TokensIn     int    `json:"tokens_in,omitempty"`
	TokensCached int    `json:"tokens_cached,omitempty"` // of TokensIn, reused from the slot's cache
	StopType     string `json:"stop_type,omitempty"`     // limit, eos, word`
	// metrics
	Metrics map[string]any `json:"metrics,omitempty"`
	// error
	Error *Error `json:"error,omitempty"`
	// token, when the task asked (Params.Logprobs)
	LP *Logprob `json:"lp,omitempty"`
}

// Logprob is a token's log probability under the model (before sampling)
// with its own text and bytes (a token's text in T may sit on the last
// token of an engine's chunk) and the most likely tokens at its position.
type Logprob struct {
	T   string       `json:"t"` // the valid UTF-8 part of its bytes
	B   []int        `json:"b"`
	P   float32      `json:"p"`
	Top []TopLogprob `json:"top,omitempty"`
}

// TopLogprob is one of the most likely tokens at a position.
type TopLogprob struct {
	Tok int32   `json:"tok"`
	T   string  `json:"t"`
	B   []int   `json:"b"`
	P   float32 `json:"p"`
}

// Cancel is the payload of SignalCancel: why, and who asked (for the
// workflow's memo). Signals sent before audit carry the reason alone, a
// JSON string, which it reads too.
type Cancel struct {
	Reason string        `json:"reason,omitempty"`
	Actor  *apikey.Actor `json:"actor,omitempty"`
}

// UnmarshalJSON reads a Cancel, or the bare reason of an older signal.
func (c *Cancel) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		*c = Cancel{}
		return json.Unmarshal(b, &c.Reason)
	}
	type plain Cancel
	return json.Unmarshal(b, (*plain)(c))
}
