package scheduler

import (
	"context"
	"sync"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
)

// PoolLister reads the running pools (control.Pools); unread are the pools
// whose query failed.
type PoolLister interface {
	ListPartial(ctx context.Context) (pools []pool.Health, unread []string, err error)
}

// NodeLister reads the nodes (control.Nodes).
type NodeLister interface {
	List(ctx context.Context) ([]control.NodeView, error)
}

// ClusterSource is the scheduler's view of the cluster: every running pool,
// with its node's state and free VRAM from the node's latest heartbeat.
// Its Candidates is a Source.
type ClusterSource struct {
	Pools PoolLister
	Nodes NodeLister

	mu   sync.Mutex
	last map[string]placement.Candidate // the last read, by pool id
}

// Candidates reads the pools. A pool whose query failed keeps its last
// known figures until it is read again or ends.
func (c *ClusterSource) Candidates(ctx context.Context) ([]placement.Candidate, error) {
	pools, unread, err := c.Pools.ListPartial(ctx)
	if err != nil {
		return nil, err
	}
	views, err := c.Nodes.List(ctx)
	if err != nil {
		return nil, err
	}
	online := map[string]bool{}
	vram := map[string]uint64{}
	for _, v := range views {
		online[v.NodeID] = v.State == node.Online
		vram[v.NodeID] = latest(v).FreeVRAMBytes()
	}
	out := make([]placement.Candidate, 0, len(pools)+len(unread))
	for _, h := range pools {
		out = append(out, placement.Candidate{PoolID: h.PoolID, NodeID: h.NodeID, ModelID: h.ModelID, URL: h.URL,
			Epoch: h.Epoch, State: h.State, Draining: h.Draining, NodeOnline: online[h.NodeID],
			SlotsTotal: h.SlotsTotal, CtxPerSlot: h.CtxSize / max(h.SlotsTotal, 1), FreeVRAM: vram[h.NodeID]})
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range unread {
		if p, ok := c.last[id]; ok {
			p.NodeOnline = online[p.NodeID]
			out = append(out, p)
		}
	}
	c.last = make(map[string]placement.Candidate, len(out))
	for _, p := range out {
		c.last[p.PoolID] = p
	}
	return out, nil
}

// NodeForPool is where a pool goes when its creator names no node: the
// Online node with the most free disk for models ("": none).
func NodeForPool(ctx context.Context, nodes NodeLister) (string, error) {
	views, err := nodes.List(ctx)
	if err != nil {
		return "", err
	}
	nodeID, best := "", uint64(0)
	for _, v := range views {
		free := latest(v).DiskFreeBytes
		if v.State == node.Online && (nodeID == "" || free > best) {
			nodeID, best = v.NodeID, free
		}
	}
	return nodeID, nil
}

// latest is a node's newest figures: its live heartbeat, else its last report.
func latest(v control.NodeView) node.Snapshot {
	if v.Live != nil {
		return *v.Live
	}
	return v.LastSnapshot
}
