package pool

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/apikey"

	"github.com/llorch/llorch/model"
)

// WorkflowType is the registered name of the pool workflow.
const WorkflowType = "Pool"

const workflowIDPrefix = "pool:"

// WorkflowID is the readable id of a pool's workflow.
func WorkflowID(nodeID, poolID string) string { return workflowIDPrefix + nodeID + ":" + poolID }

// IDFromWorkflowID reads the pool id out of pool:<node>:<pool>, the inverse
// of WorkflowID.
func IDFromWorkflowID(workflowID string) (string, bool) {
	if !strings.HasPrefix(workflowID, workflowIDPrefix) {
		return "", false
	}
	return workflowID[strings.LastIndexByte(workflowID, ':')+1:], true
}

// PoolIDKey finds a pool's workflow by pool id.
var PoolIDKey = temporal.NewSearchAttributeKeyKeyword("PoolId")

// StateKey is a pool's State, kept current by its workflow, so a list of
// pools shows their lifecycle without a query per pool.
var StateKey = temporal.NewSearchAttributeKeyKeyword("PoolState")

// Memo fields a pool's workflow gets at creation, so a list of pools has
// its figures without a query per pool (see Memo).
const (
	MemoSlots   = "slots"
	MemoCtxSize = "ctx_size"
	MemoEngine  = "engine"
	// MemoEmbeddings is set (true) on a pool that serves embeddings.
	MemoEmbeddings = "embeddings"
)

// Memo is what Create puts in a pool workflow's memo.
func (s Spec) Memo() map[string]any {
	m := map[string]any{MemoSlots: s.Slots, MemoCtxSize: s.CtxSize, MemoEngine: string(s.Engine)}
	if s.Embeddings {
		m[MemoEmbeddings] = true
	}
	return m
}

var idPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// ValidateID checks a pool id (unique in the cluster).
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("pool id %q is invalid: use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit", id)
	}
	return nil
}

// Engine is the kind of llama.cpp process a pool runs.
type Engine string

const (
	Builtin     Engine = "builtin"      // llorch engine (libllama)
	LlamaServer Engine = "llama-server" // llama.cpp's own server
)

// State of a pool.
type State string

const (
	Starting State = "Starting" // staging, preflight, engine loading
	Ready    State = "Ready"    // engine answers /health 200
	Unready  State = "Unready"  // engine down; restarting with backoff
	Draining State = "Draining" // no new work; stopping
	Stopped  State = "Stopped"  // drained; the workflow has ended
	Failed   State = "Failed"   // circuit open after repeated failures
)

// Spec is what a pool runs, and where.
type Spec struct {
	PoolID     string `json:"pool_id"`
	NodeID     string `json:"node_id"`
	ModelID    string `json:"model_id"`
	Engine     Engine `json:"engine"`
	DeviceMask string `json:"device_mask"` // CUDA_VISIBLE_DEVICES, e.g. "0,1"; "" = none (CPU)
	CtxSize    int    `json:"ctx"`
	Slots      int    `json:"slots"`
	NGPULayers int    `json:"n_gpu_layers"`
	// Embeddings: the engine serves embeddings (mean-pooled) and no
	// generations, as llama-server --embeddings.
	Embeddings bool `json:"embeddings,omitempty"`
}

// HandoffModel is the model part of a handoff record.
type HandoffModel struct {
	ID     string `json:"id"`
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
}

// Handoff is what the node writes to <runtime>/engines/<pool>.json once the
// engine answers /health 200 (DESIGN.md decision 8). Nothing off the node
// reads the file; the pool workflow gets the same record.
type Handoff struct {
	Engine        Engine       `json:"engine"`
	EngineVersion string       `json:"engine_version"`
	URL           string       `json:"url"`
	PoolID        string       `json:"pool_id"`
	ReplicaID     string       `json:"replica_id"`
	Model         HandoffModel `json:"model"`
	DeviceMask    string       `json:"device_mask"`
	Slots         int          `json:"slots"`
	PID           int          `json:"pid"`
	StartedAt     time.Time    `json:"started_at"`
	HealthyAt     time.Time    `json:"healthy_at"` // the engine's first /health 200
	Epoch         int64        `json:"epoch"`
}

// HandoffPath is where a pool's handoff file lives on its node.
func HandoffPath(runtimeDir, poolID string) string {
	return filepath.Join(runtimeDir, "engines", poolID+".json")
}

// Health is a pool as a reader sees it.
type Health struct {
	PoolID        string    `json:"pool_id"`
	NodeID        string    `json:"node_id"`
	ModelID       string    `json:"model_id"`
	State         State     `json:"state"`
	Live          bool      `json:"live"`
	Ready         bool      `json:"ready"`
	Draining      bool      `json:"draining"`
	SlotsTotal    int       `json:"slots_total"`
	CtxSize       int       `json:"ctx,omitempty"` // total context of the engine (0: the model's)
	SlotsFree     int       `json:"slots_free"`
	LastError     string    `json:"last_error,omitempty"`
	Engine        Engine    `json:"engine"`
	Embeddings    bool      `json:"embeddings,omitempty"` // serves embeddings, no generations
	EngineVersion string    `json:"engine_version,omitempty"`
	URL           string    `json:"url,omitempty"`
	PID           int       `json:"pid,omitempty"`
	Epoch         int64     `json:"epoch"`
	Restarts      int       `json:"restarts"`
	ReadyAt       time.Time `json:"ready_at,omitempty"`
	StateSince    time.Time `json:"state_since"`
	// Reload is the pool's current or last reload.
	Reload *ReloadStatus `json:"reload,omitempty"`
}

// Reload modes.
const (
	// SideBySide: the new engine starts beside the serving one, which keeps
	// serving until the new one is ready.
	SideBySide = "side-by-side"
	// DrainFirst: the node has no room for both; the serving engine is
	// drained and stopped first.
	DrainFirst = "drain-first"
	// Replace: no engine was serving; the next start uses the new model.
	Replace = "replace"
)

// ReloadStatus follows one reload.
type ReloadStatus struct {
	FromModel  string    `json:"from_model"`
	ToModel    string    `json:"to_model"`
	Mode       string    `json:"mode,omitempty"`
	Step       string    `json:"step"` // queued, staging, preflight, starting, draining, done, failed
	Error      string    `json:"error,omitempty"`
	Epoch      int64     `json:"epoch,omitempty"` // of the new engine
	StartedAt  time.Time `json:"started_at"`
	FinishedAt time.Time `json:"finished_at,omitempty"`
}

// Finished says whether the reload has ended, either way.
func (r *ReloadStatus) Finished() bool { return r == nil || r.Step == "done" || r.Step == "failed" }

// Workflow messages.
const (
	QueryHealth   = "health"
	UpdateDrain   = "drain"
	UpdateReload  = "reload"
	UpdateHandoff = "handoff"
)

// ReloadRequest is the argument of the reload update.
type ReloadRequest struct {
	ModelID    string `json:"model_id"`
	DeadlineMs int64  `json:"deadline_ms"` // drain-first: how long in-flight work may run
	Identity   string `json:"identity,omitempty"`
	// Actor is who asked, for the workflow's memo (nil before audit).
	Actor *apikey.Actor `json:"actor,omitempty"`
}

// HandoffEvent is a node's word on an engine's handoff file: a fresh one
// (the readiness event), or one a restarted worker found (Adopt).
type HandoffEvent struct {
	Handoff Handoff `json:"handoff"`
	Adopt   bool    `json:"adopt"`
	// Gone (with Adopt): the engine this handoff names no longer runs; it
	// died while its worker was down. The pool restarts it at once rather
	// than waiting for its supervisor's heartbeat timeout.
	Gone bool `json:"gone,omitempty"`
}

// HandoffReply says whether the pool owns that engine; the node stops it
// if not (fencing).
type HandoffReply struct {
	Accept bool   `json:"accept"`
	Reason string `json:"reason,omitempty"`
}

// DrainRequest is the argument of the drain update.
type DrainRequest struct {
	DeadlineMs int64  `json:"deadline_ms"`
	Identity   string `json:"identity,omitempty"`
	// Actor is who asked, for the workflow's memo (nil before audit).
	Actor *apikey.Actor `json:"actor,omitempty"`
}

// Error types of pool failures.
const (
	ErrInsufficientVRAM = "INSUFFICIENT_VRAM"
	ErrInsufficientRAM  = "INSUFFICIENT_RAM"
	ErrEngineStart      = "ENGINE_START_FAILED"
	ErrModelNotStaged   = "MODEL_NOT_STAGED"
	ErrEnded            = "POOL_ENDED"
	ErrDraining         = "POOL_DRAINING"
	ErrReloadInProgress = "RELOAD_IN_PROGRESS"
	// ErrInvalidParams: an update's argument is malformed (a bad model id).
	ErrInvalidParams = "INVALID_PARAMS"
)

// Supervision: restart backoff 1 s doubling to 60 s with jitter; the circuit
// opens after MaxConsecutiveFailures; a run StableAfter long resets it.
const (
	BackoffInitial         = time.Second
	BackoffMax             = 60 * time.Second
	MaxConsecutiveFailures = 5
	StableAfter            = 5 * time.Minute
)

// Input starts a pool, or continues one (Carry) after continue-as-new.
type Input struct {
	Spec Spec
	// ContinueAsNewEvents: continue as new past this many history events,
	// checked whenever the engine is down (0: DefaultContinueAsNewEvents,
	// or earlier when Temporal suggests it).
	ContinueAsNewEvents int
	Carry               *Carry `json:",omitempty"`
}

// Carry is what a pool's next run keeps.
type Carry struct {
	Health    Health
	Entry     model.Entry
	Failures  int
	Backoff   time.Duration
	LastEpoch int64
}

// DefaultContinueAsNewEvents bounds a pool's history: its events grow only
// with restarts and reloads, not with time.
const DefaultContinueAsNewEvents = 5000
