package modelstore

import (
	"fmt"
	"sort"
	"time"

	"github.com/llorch/llorch/node"
)

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

// PartialFile is a download in progress or abandoned.
type PartialFile struct {
	SHA256  string
	Size    int64
	ModTime time.Time
}

// PlanGC decides evictions: stale partial files, then Retired models, then
// least recently used ones until usage is under the low watermark; it starts
// evicting by LRU only above the high watermark. A model in inUse is never
// chosen.
func PlanGC(copies []node.ModelCopy, partials []PartialFile, p node.GCPolicy, free uint64,
	inUse, retired map[string]bool, now time.Time) GCPlan {
	var usage int64
	for _, c := range copies {
		usage += c.Size
	}
	for _, f := range partials {
		usage += f.Size
	}
	budget := p.BudgetBytes
	if budget <= 0 {
		budget = usage + int64(free)
	}
	plan := GCPlan{UsageBytes: usage, BudgetBytes: budget, Evictions: []Eviction{}, KeptInUse: []string{},
		HighBytes: int64(p.HighWatermark * float64(budget)), LowBytes: int64(p.LowWatermark * float64(budget))}
	after := usage
	evict := func(e Eviction) {
		plan.Evictions = append(plan.Evictions, e)
		after -= e.Bytes
	}
	for _, f := range partials {
		if p.PartialMaxAge > 0 && now.Sub(f.ModTime) > p.PartialMaxAge {
			evict(Eviction{Kind: "partial", SHA256: f.SHA256, Bytes: f.Size, LastUsed: f.ModTime, Reason: "stale-partial",
				Detail: fmt.Sprintf("partial download untouched for %s (limit %s)", now.Sub(f.ModTime).Round(time.Second), p.PartialMaxAge)})
		}
	}
	var candidates []node.ModelCopy
	for _, c := range copies {
		switch {
		case inUse[c.SHA256]:
			plan.KeptInUse = append(plan.KeptInUse, c.SHA256)
		case retired[c.SHA256]:
			evict(Eviction{Kind: "model", SHA256: c.SHA256, ModelID: c.ModelID, Bytes: c.Size, LastUsed: lastUsed(c),
				Reason: "retired", Detail: "model is Retired in the catalog and no pool uses it"})
		default:
			candidates = append(candidates, c)
		}
	}
	if after > plan.HighBytes {
		sort.SliceStable(candidates, func(i, j int) bool { return lastUsed(candidates[i]).Before(lastUsed(candidates[j])) })
		for _, c := range candidates {
			if after <= plan.LowBytes {
				break
			}
			evict(Eviction{Kind: "model", SHA256: c.SHA256, ModelID: c.ModelID, Bytes: c.Size, LastUsed: lastUsed(c), Reason: "lru",
				Detail: fmt.Sprintf("usage %d bytes above high watermark %d; least recently used (evicting down to low watermark %d)",
					plan.UsageBytes, plan.HighBytes, plan.LowBytes)})
		}
	}
	plan.UsageAfter = after
	plan.UnderWatermark = after <= plan.LowBytes
	return plan
}

func lastUsed(c node.ModelCopy) time.Time {
	if c.LastUsed.IsZero() {
		return c.StagedAt
	}
	return c.LastUsed
}
