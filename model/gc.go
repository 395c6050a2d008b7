package model

import (
	"time"

	"github.com/llorch/llorch/node"
)

// GCInput runs garbage collection on one node: the GC workflow's input.
type GCInput struct {
	NodeID string
	Policy node.GCPolicy
	DryRun bool
	// InUse are digests pools reference (starting, ready, draining).
	InUse []string
}

// GCResult is the GC workflow's plan and what it deleted.
type GCResult struct {
	Plan    GCPlan
	Evicted []Eviction
	DryRun  bool
}

// Eviction is one deletion GC decided on, with the facts behind it: these
// are recorded as the input of the eviction activity, so the Temporal UI
// shows why every byte went.
type Eviction struct {
	Kind     string    `json:"kind"` // model | partial
	SHA256   string    `json:"sha256"`
	ModelID  string    `json:"model_id,omitempty"`
	Bytes    int64     `json:"bytes"`
	LastUsed time.Time `json:"last_used"`
	Reason   string    `json:"reason"` // retired | lru | stale-partial
	Detail   string    `json:"detail"`
}

// GCPlan is what GC would do, and the figures it decided on.
type GCPlan struct {
	UsageBytes     int64      `json:"usage_bytes"`
	BudgetBytes    int64      `json:"budget_bytes"`
	HighBytes      int64      `json:"high_watermark_bytes"`
	LowBytes       int64      `json:"low_watermark_bytes"`
	Evictions      []Eviction `json:"evictions"`
	UsageAfter     int64      `json:"usage_after_bytes"`
	KeptInUse      []string   `json:"kept_in_use"`
	UnderWatermark bool       `json:"under_low_watermark_after"`
}
