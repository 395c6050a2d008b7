package link

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/llorch/llorch/node"
)

// Steps a figure must move from its value at the last version bump before
// it bumps the version again: the figures refresh every heartbeat, and a
// byte's change in free memory must not wake every follower.
const (
	// GPUFreeStepDivisor: a GPU's free memory moves by 1/100 of its total.
	GPUFreeStepDivisor = 100
	// DiskFreeStep: the model dir's free space moves by 1 GiB.
	DiskFreeStep = 1 << 30
)

// Source is a node's live state with its version. The agent feeds it with
// Set; Server reads it. Safe for concurrent use.
type Source struct {
	mu    sync.Mutex
	state node.LinkState
	base  node.LinkFacts // the facts at the last bump: figures move from here
	fed   bool           // Set was called: the first call always bumps
	wake  chan struct{}  // closed at the next bump
}

// NewSource is the state of node nodeID before anything was fed. Its
// version starts at the current time in microseconds, so a restarted
// node's versions are above those its followers hold (a bump per
// microsecond of uptime would be needed to catch up), and it stays below
// 2^53, exact in every JSON reader.
func NewSource(nodeID string) *Source {
	s := &Source{wake: make(chan struct{})}
	s.state = node.LinkState{NodeID: nodeID, Version: uint64(time.Now().UnixMicro()), LinkFacts: normalized(node.LinkFacts{})}
	return s
}

// Set replaces the facts, and bumps the version when they differ from
// those at the last bump in something a placement reads: the pools, the
// models held (not their use times), a GPU's free memory by
// 1/GPUFreeStepDivisor of its total or the free disk by DiskFreeStep.
// Otherwise the figures refresh under the same version. Set keeps f's
// slices: pass ones the caller no longer changes.
func (s *Source) Set(f node.LinkFacts) {
	f = normalized(f)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.state.LinkFacts = f
	if s.fed && !moved(s.base, f) {
		return
	}
	s.base, s.fed = f, true
	s.state.Version++
	close(s.wake)
	s.wake = make(chan struct{})
}

// State is the current state.
func (s *Source) State() node.LinkState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// Wait returns the state once its version differs from after (a newer
// one, or one of a restarted node), or the current state when ctx ends.
func (s *Source) Wait(ctx context.Context, after uint64) node.LinkState {
	for {
		s.mu.Lock()
		st, wake := s.state, s.wake
		s.mu.Unlock()
		if st.Version != after {
			return st
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return s.State()
		}
	}
}

// moved says whether b differs from a in something a placement reads: any
// field of a pool (its engine, readiness, slots busy and queued, service
// time, claims: a replica places by them).
func moved(a, b node.LinkFacts) bool {
	if !slices.EqualFunc(a.Pools, b.Pools, node.LinkPool.Same) {
		return true
	}
	if !slices.EqualFunc(a.Models, b.Models, func(x, y node.ModelCopy) bool {
		return x.ModelID == y.ModelID && x.SHA256 == y.SHA256 && x.Size == y.Size
	}) {
		return true
	}
	if !slices.EqualFunc(a.GPUs, b.GPUs, func(x, y node.GPUUsage) bool {
		return x.Index == y.Index && x.MemoryTotalBytes == y.MemoryTotalBytes &&
			distance(x.MemoryFreeBytes, y.MemoryFreeBytes) < max(1, y.MemoryTotalBytes/GPUFreeStepDivisor)
	}) {
		return true
	}
	return distance(a.DiskFreeBytes, b.DiskFreeBytes) >= DiskFreeStep
}

func distance(a, b uint64) uint64 {
	if a > b {
		return a - b
	}
	return b - a
}

// normalized has empty lists rather than nil ones, so the JSON shows [].
func normalized(f node.LinkFacts) node.LinkFacts {
	if f.Pools == nil {
		f.Pools = []node.LinkPool{}
	}
	if f.GPUs == nil {
		f.GPUs = []node.GPUUsage{}
	}
	if f.Models == nil {
		f.Models = []node.ModelCopy{}
	}
	return f
}
