package placement

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/task"
)

func cand(id, node string, vram uint64, busy int) Candidate {
	return Candidate{PoolID: id, NodeID: node, ModelID: "m", State: pool.Ready, NodeOnline: true, SlotsTotal: 2, SlotsBusy: busy, FreeVRAM: vram}
}

func TestChoose(t *testing.T) {
	no := false
	cands := []Candidate{cand("a", "n1", 10, 0), cand("b", "n2", 20, 1), cand("c", "n3", 20, 0), cand("d", "n4", 30, 2)}
	pick := func(r Request) string {
		c, err := Choose(cands, r)
		if err != nil {
			return err.Error()
		}
		return c.PoolID
	}
	require.Equal(t, "c", pick(Request{ModelID: "m"}), "most VRAM among free (d is full), then fewest busy")
	require.Equal(t, "b", pick(Request{ModelID: "m", Placement: task.Placement{AvoidPools: []string{"c"}}}))
	require.Equal(t, "a", pick(Request{ModelID: "m", Placement: task.Placement{NodeID: "n1"}}))
	require.Equal(t, "a", pick(Request{ModelID: "m", Placement: task.Placement{Mode: "prefer", PreferPools: []string{"a"}}}))
	require.Equal(t, "c", pick(Request{ModelID: "m", Placement: task.Placement{Mode: "prefer", PreferPools: []string{"d"}}}), "preferred is full: fallback")
	_, err := Choose(cands, Request{ModelID: "m", Placement: task.Placement{PreferPools: []string{"d"}, AllowFallback: &no}})
	require.ErrorIs(t, err, ErrBusy)
	require.Equal(t, "b", pick(Request{ModelID: "m", Placement: task.Placement{Mode: "pin", PinPoolID: "b"}}))
	_, err = Choose(cands, Request{ModelID: "m", Placement: task.Placement{Mode: "pin", PinPoolID: "d"}})
	require.ErrorIs(t, err, ErrBusy, "a full pinned pool is waited for")
	_, err = Choose(cands, Request{ModelID: "m", Placement: task.Placement{Mode: "pin", PinPoolID: "zz"}})
	require.ErrorIs(t, err, ErrNoPool)
	_, err = Choose(cands, Request{ModelID: "other"})
	require.ErrorIs(t, err, ErrNoPool)
	_, err = Choose(cands, Request{ModelID: "m", Exclude: []string{"a", "b", "c", "d"}})
	require.ErrorIs(t, err, ErrNoPool)

	// A pinned pool that is not ready is an error, never a fallback.
	starting := append([]Candidate{}, cands...)
	starting[1].State = pool.Starting
	_, err = Choose(starting, Request{ModelID: "m", Placement: task.Placement{Mode: "pin", PinPoolID: "b"}})
	require.ErrorIs(t, err, ErrNoPool)
	// Draining pools and pools on nodes that are not Online get nothing.
	gone := []Candidate{cand("a", "n1", 10, 0), cand("b", "n2", 10, 0)}
	gone[0].Draining, gone[1].NodeOnline = true, false
	_, err = Choose(gone, Request{ModelID: "m"})
	require.ErrorIs(t, err, ErrNoPool)
	// A pool still starting makes the task wait, not fail.
	gone[1].NodeOnline, gone[1].State = true, pool.Starting
	_, err = Choose(gone, Request{ModelID: "m"})
	require.True(t, errors.Is(err, ErrBusy), err)
}

// Queueing: any Ready pool serves, busy or not, the shortest expected wait
// ((busy + queued + pending) / slots) first, then VRAM, then pool id; the
// rules (pin, prefer, avoid, node) hold as without it.
func TestChooseQueue(t *testing.T) {
	no := false
	cands := []Candidate{cand("a", "n1", 10, 2), cand("b", "n2", 20, 2), cand("c", "n3", 30, 2), cand("d", "n4", 5, 1)}
	cands[0].Queued = 1                                // load 3 / 2 slots
	cands[1].Queued, cands[1].QueuedInteractive = 2, 2 // 4 / 2
	cands[2].Pending = 3                               // 5 / 2
	cands[3].SlotsTotal, cands[3].Queued = 1, 1        // 2 / 1
	pick := func(r Request) string {
		r.ModelID, r.Queue = "m", true
		c, err := Choose(cands, r)
		if err != nil {
			return err.Error()
		}
		return c.PoolID
	}
	require.Equal(t, "a", pick(Request{}), "the shortest wait, though every pool is busy")
	require.Equal(t, "b", pick(Request{Placement: task.Placement{AvoidPools: []string{"a"}}}), "d's 2/1 ties b's 4/2: more free VRAM")
	require.Equal(t, "c", pick(Request{Placement: task.Placement{NodeID: "n3"}}))
	require.Equal(t, "c", pick(Request{Placement: task.Placement{Mode: "prefer", PreferPools: []string{"c"}}}))
	require.Equal(t, "b", pick(Request{Placement: task.Placement{Mode: "pin", PinPoolID: "b"}}), "a busy pinned pool is joined")
	starting := append([]Candidate{}, cands...)
	for i := range starting {
		starting[i].State = pool.Starting
	}
	_, err := Choose(starting, Request{ModelID: "m", Queue: true})
	require.ErrorIs(t, err, ErrBusy, "no Ready pool yet: wait for one")
	_, err = Choose(cands, Request{ModelID: "m", Queue: true, Placement: task.Placement{PreferPools: []string{"zz"}, AllowFallback: &no}})
	require.ErrorIs(t, err, ErrBusy)
	// Without Queue only a free slot serves.
	_, err = Choose(cands, Request{ModelID: "m"})
	require.ErrorIs(t, err, ErrBusy)
}

// BenchmarkChoose1000Nodes places one task among 1000 nodes of 2 pools each.
func BenchmarkChoose1000Nodes(b *testing.B) {
	cands := make([]Candidate, 0, 2000)
	for n := range 1000 {
		for p := range 2 {
			c := cand(fmt.Sprintf("pool-%d-%d", n, p), fmt.Sprintf("node-%d", n), uint64((n*7919)%1000)<<30, (n+p)%3)
			if n%10 == 0 {
				c.ModelID = "other"
			}
			cands = append(cands, c)
		}
	}
	r := Request{ModelID: "m", Placement: task.Placement{AvoidPools: []string{"pool-1-0"}}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Choose(cands, r); err != nil {
			b.Fatal(err)
		}
	}
}

// engine and min ctx hold a task to the pools that meet them; a pool that
// names no engine runs the built-in one; a slot of unknown size meets no
// min ctx; a pinned pool that does not meet them is refused, not waited for.
func TestChooseEngineAndCtx(t *testing.T) {
	a, b, c := cand("a", "n1", 30, 0), cand("b", "n2", 20, 0), cand("c", "n3", 10, 0)
	a.Engine, a.CtxPerSlot = pool.LlamaServer, 4096
	b.Engine, b.CtxPerSlot = pool.Builtin, 1024
	c.CtxPerSlot = 8192 // no engine named: built-in
	cands := []Candidate{a, b, c}
	pick := func(p task.Placement) string {
		got, err := Choose(cands, Request{ModelID: "m", Placement: p})
		if err != nil {
			return err.Error()
		}
		return got.PoolID
	}
	require.Equal(t, "a", pick(task.Placement{Engine: task.EngineAny}))
	require.Equal(t, "a", pick(task.Placement{Engine: "llama-server"}))
	require.Equal(t, "b", pick(task.Placement{Engine: "builtin"}))
	require.Equal(t, "a", pick(task.Placement{MinCtx: 2048}))
	require.Equal(t, "c", pick(task.Placement{MinCtx: 2048, Engine: "builtin"}))
	require.Contains(t, pick(task.Placement{MinCtx: 9000}), ErrNoPool.Error())
	unknown := cand("u", "n4", 99, 0)
	_, err := Choose([]Candidate{unknown}, Request{ModelID: "m", Placement: task.Placement{MinCtx: 1}})
	require.ErrorIs(t, err, ErrNoPool)
	_, err = Choose(cands, Request{ModelID: "m", Placement: task.Placement{Mode: "pin", PinPoolID: "b", MinCtx: 2048}})
	require.ErrorIs(t, err, ErrNoPool)
}

// A task goes to the pool whose slot caches hold the longest prefix of its
// prompt, unless kv_hint is cold or that pool's queue is more than
// CacheSlack generations per slot longer than the least loaded one's.
func TestChooseFollowsCachedPrefix(t *testing.T) {
	sys := task.Message{Role: "system", Content: "you are terse"}
	turn1 := []task.Message{sys, {Role: "user", Content: "hi"}}
	turn2 := append(append([]task.Message{}, turn1...), task.Message{Role: "assistant", Content: "hello"},
		task.Message{Role: "user", Content: "more"})
	held := func(msgs []task.Message) []uint64 {
		h := prefix.Hashes(prefix.Messages(msgs))
		slices.Sort(h)
		return h
	}
	a, b, c := cand("a", "n1", 30, 0), cand("b", "n2", 10, 0), cand("c", "n3", 10, 0)
	b.Prefixes = held(turn2[:3])                                         // the session's last turn
	c.Prefixes = held([]task.Message{sys, {Role: "user", Content: "x"}}) // another session, same system prompt
	r := Request{ModelID: "m", Prefix: prefix.Messages(turn2)}
	pick := func(r Request, cs ...Candidate) string {
		got, err := Choose(cs, r)
		require.NoError(t, err)
		return got.PoolID
	}
	require.Equal(t, "b", pick(r, a, b, c), "the pool holding the session's history")
	require.Equal(t, "c", pick(Request{ModelID: "m", Prefix: prefix.Messages([]task.Message{sys, {Role: "user", Content: "new"}})}, a, c),
		"a new session goes where its system prompt is")
	cold := r
	cold.Placement.KVHint = task.KVCold
	require.Equal(t, "a", pick(cold, a, b, c), "cold: load (most free VRAM) alone")
	require.Equal(t, "a", pick(Request{ModelID: "m"}, a, b, c), "no prompt chain: load alone")

	// Queueing: b's queue within one generation per slot of a's keeps the
	// task on b; beyond, a wins.
	r.Queue = true
	b.SlotsBusy, b.Queued = 2, 2 // 4 per 2 slots: 2 each
	a.SlotsBusy, a.Queued = 2, 0 // 1 each
	require.Equal(t, "b", pick(r, a, b))
	b.Queued = 3 // 2.5 each: 1.5 more than a
	require.Equal(t, "a", pick(r, a, b), "load wins past the slack")
}

// A pool that serves embeddings takes no generations, and an embeddings
// request goes only to such a pool.
func TestChooseKeepsEmbeddingsApart(t *testing.T) {
	gen, emb := cand("gen", "n1", 10, 0), cand("emb", "n2", 30, 0)
	emb.Embeddings = true
	got, err := Choose([]Candidate{gen, emb}, Request{ModelID: "m"})
	require.NoError(t, err)
	require.Equal(t, "gen", got.PoolID, "a generation never lands on an embeddings pool, however free")
	got, err = Choose([]Candidate{gen, emb}, Request{ModelID: "m", Embeddings: true})
	require.NoError(t, err)
	require.Equal(t, "emb", got.PoolID)
	_, err = Choose([]Candidate{emb}, Request{ModelID: "m"})
	require.ErrorIs(t, err, ErrNoPool)
}
