package modelstore

import (
	"fmt"
	"sort"
	"time"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

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
	inUse, retired map[string]bool, now time.Time) model.GCPlan {
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
	plan := model.GCPlan{UsageBytes: usage, BudgetBytes: budget, Evictions: []model.Eviction{}, KeptInUse: []string{},
		HighBytes: int64(p.HighWatermark * float64(budget)), LowBytes: int64(p.LowWatermark * float64(budget))}
	after := usage
	evict := func(e model.Eviction) {
		plan.Evictions = append(plan.Evictions, e)
		after -= e.Bytes
	}
	for _, f := range partials {
		if p.PartialMaxAge > 0 && now.Sub(f.ModTime) > p.PartialMaxAge {
			evict(model.Eviction{Kind: "partial", SHA256: f.SHA256, Bytes: f.Size, LastUsed: f.ModTime, Reason: "stale-partial",
				Detail: fmt.Sprintf("partial download untouched for %s (limit %s)", now.Sub(f.ModTime).Round(time.Second), p.PartialMaxAge)})
		}
	}
	var candidates []node.ModelCopy
	for _, c := range copies {
		switch {
		case inUse[c.SHA256]:
			plan.KeptInUse = append(plan.KeptInUse, c.SHA256)
		case retired[c.SHA256]:
			evict(model.Eviction{Kind: "model", SHA256: c.SHA256, ModelID: c.ModelID, Bytes: c.Size, LastUsed: lastUsed(c),
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
			evict(model.Eviction{Kind: "model", SHA256: c.SHA256, ModelID: c.ModelID, Bytes: c.Size, LastUsed: lastUsed(c), Reason: "lru",
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
