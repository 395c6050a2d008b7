package scheduler

import (
	"context"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
)

// NodeLister reads the nodes (control.Nodes).
type NodeLister interface {
	List(ctx context.Context) ([]control.NodeView, error)
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
