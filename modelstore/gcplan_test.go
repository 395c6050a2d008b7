package modelstore

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/node"
)

func sha(c byte) string {
	b := make([]byte, 64)
	for i := range b {
		b[i] = c
	}
	return string(b)
}

func TestPlanGCWatermarksLRUInUseRetired(t *testing.T) {
	now := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	copies := []node.ModelCopy{
		{ModelID: "old", SHA256: sha('a'), Size: 300, LastUsed: now.Add(-10 * time.Hour)},
		{ModelID: "busy-oldest", SHA256: sha('b'), Size: 300, LastUsed: now.Add(-20 * time.Hour)},
		{ModelID: "new", SHA256: sha('c'), Size: 300, LastUsed: now.Add(-1 * time.Hour)},
		{ModelID: "mid", SHA256: sha('d'), Size: 50, StagedAt: now.Add(-5 * time.Hour)},
	}
	p := node.GCPolicy{BudgetBytes: 1000, HighWatermark: 0.9, LowWatermark: 0.5}
	inUse := map[string]bool{sha('b'): true}
	plan := PlanGC(copies, nil, p, 0, inUse, nil, now)
	require.EqualValues(t, 950, plan.UsageBytes)
	require.EqualValues(t, 900, plan.HighBytes)
	require.EqualValues(t, 500, plan.LowBytes)
	// Over the high watermark: LRU order a (10h), d (5h, by staged time), c (1h); b is in use.
	var got []string
	for _, e := range plan.Evictions {
		got = append(got, e.ModelID)
		require.Equal(t, "lru", e.Reason)
		require.NotEqual(t, sha('b'), e.SHA256, "an in-use model is never evicted")
	}
	require.Equal(t, []string{"old", "mid", "new"}, got)
	require.EqualValues(t, 300, plan.UsageAfter)
	require.True(t, plan.UnderWatermark)
	require.Equal(t, []string{sha('b')}, plan.KeptInUse)
}

func TestPlanGCBelowHighWatermarkEvictsOnlyRetiredAndStale(t *testing.T) {
	now := time.Now()
	copies := []node.ModelCopy{
		{ModelID: "keep", SHA256: sha('a'), Size: 100, LastUsed: now.Add(-100 * time.Hour)},
		{ModelID: "gone", SHA256: sha('b'), Size: 100, LastUsed: now},
		{ModelID: "retired-but-used", SHA256: sha('c'), Size: 100},
	}
	partials := []PartialFile{{SHA256: sha('e'), Size: 10, ModTime: now.Add(-48 * time.Hour)}, {SHA256: sha('f'), Size: 10, ModTime: now}}
	p := node.GCPolicy{HighWatermark: 0.9, LowWatermark: 0.7, PartialMaxAge: 24 * time.Hour}
	plan := PlanGC(copies, partials, p, 10_000, map[string]bool{sha('c'): true},
		map[string]bool{sha('b'): true, sha('c'): true}, now)
	require.EqualValues(t, 320+10_000, plan.BudgetBytes, "no budget: usage plus free space")
	require.Len(t, plan.Evictions, 2)
	require.Equal(t, "stale-partial", plan.Evictions[0].Reason)
	require.Equal(t, sha('e'), plan.Evictions[0].SHA256)
	require.Equal(t, "retired", plan.Evictions[1].Reason)
	require.Equal(t, "gone", plan.Evictions[1].ModelID)
}

func TestPlanGCCannotReachLowWatermarkWhenAllInUse(t *testing.T) {
	copies := []node.ModelCopy{{ModelID: "a", SHA256: sha('a'), Size: 900}}
	plan := PlanGC(copies, nil, node.GCPolicy{BudgetBytes: 1000, HighWatermark: 0.8, LowWatermark: 0.5}, 0,
		map[string]bool{sha('a'): true}, nil, time.Now())
	require.Empty(t, plan.Evictions)
	require.False(t, plan.UnderWatermark)
}
