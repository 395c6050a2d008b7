package apiserver

import (
	"context"

	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
)

// Candidates is the scheduler's view of the cluster: every running pool,
// with its node's state and free VRAM from the node's latest heartbeat.
// A pool whose query failed keeps its last known figures until it is read
// again or ends.
func (s *Server) Candidates(ctx context.Context) ([]placement.Candidate, error) {
	pools, unread, err := s.deps.Pools.ListPartial(ctx)
	if err != nil {
		return nil, err
	}
	views, err := s.nodes.List(ctx)
	if err != nil {
		return nil, err
	}
	online := map[string]bool{}
	vram := map[string]uint64{}
	for _, v := range views {
		online[v.NodeID] = v.State == node.Online
		snap := v.LastSnapshot
		if v.Live != nil {
			snap = *v.Live
		}
		vram[v.NodeID] = snap.FreeVRAMBytes()
	}
	out := make([]placement.Candidate, 0, len(pools)+len(unread))
	for _, h := range pools {
		out = append(out, placement.Candidate{PoolID: h.PoolID, NodeID: h.NodeID, ModelID: h.ModelID, URL: h.URL,
			Epoch: h.Epoch, State: h.State, Draining: h.Draining, NodeOnline: online[h.NodeID],
			SlotsTotal: h.SlotsTotal, CtxPerSlot: h.CtxSize / max(h.SlotsTotal, 1), FreeVRAM: vram[h.NodeID]})
	}
	s.candMu.Lock()
	defer s.candMu.Unlock()
	for _, id := range unread {
		if c, ok := s.lastCands[id]; ok {
			c.NodeOnline = online[c.NodeID]
			out = append(out, c)
		}
	}
	s.lastCands = make(map[string]placement.Candidate, len(out))
	for _, c := range out {
		s.lastCands[c.PoolID] = c
	}
	return out, nil
}
