package node

import "time"

// The node link (DESIGN.md decisions 5, 10, 11; docs/node-link.md): every
// `llorch worker` serves its live state over authenticated HTTP at
// Inventory.LinkURL, so any apiserver replica can follow it without asking
// Temporal. Later steps add task event streams and slot claims here.
const (
	// LinkStatePath answers the node's LinkState. With LinkAfterParam it
	// long-polls: the answer comes once Version differs from after, or at
	// the wait bound with the current state.
	LinkStatePath = "/link/v1/state"
	// LinkAfterParam is the Version the caller holds (decimal).
	LinkAfterParam = "after"
	// LinkWaitParam bounds a long-poll (a Go duration: 30s, 500ms); only
	// with after. At most LinkMaxWait.
	LinkWaitParam = "wait"

	LinkDefaultWait = 30 * time.Second
	LinkMaxWait     = 60 * time.Second
)

// LinkState is a node's live state as its link serves it.
type LinkState struct {
	NodeID string `json:"node_id"`
	// Version grows when something a placement reads changes: a pool's
	// readiness, engine or slots, the models held, or a GPU's free memory
	// or the free disk by more than a step. Between bumps the figures may
	// still refresh (At moves). It starts at the worker's start time in
	// microseconds, so a restarted worker's versions exceed its
	// predecessor's, and stays below 2^53 (exact in every JSON reader).
	Version uint64 `json:"version"`
	LinkFacts
}

// LinkFacts is what a node knows of itself: the agent gathers it, the link
// adds the node id and the version.
type LinkFacts struct {
	// At is when the figures were read.
	At time.Time `json:"at"`
	// Pools are the node's engines that wrote a handoff (sorted by pool id).
	Pools         []LinkPool  `json:"pools"`
	GPUs          []GPUUsage  `json:"gpus"`
	DiskFreeBytes uint64      `json:"disk_free_bytes"`
	Models        []ModelCopy `json:"models"`
	ModelBytes    uint64      `json:"model_bytes"`
}

// LinkPool is a pool's engine on the node, as the node sees it.
type LinkPool struct {
	PoolID  string `json:"pool_id"`
	ModelID string `json:"model_id"`
	Epoch   int64  `json:"epoch"`
	URL     string `json:"url"`
	// Ready: the engine the handoff names runs, held by this worker.
	Ready      bool `json:"ready"`
	SlotsTotal int  `json:"slots_total"`
	// SlotsBusy is the generations this node runs on the engine now.
	SlotsBusy int `json:"slots_busy"`
	// Queued is the generations waiting at the node for a slot of this
	// engine (both priorities); QueuedInteractive those of priority
	// interactive, which go first.
	Queued            int `json:"queued"`
	QueuedInteractive int `json:"queued_interactive"`
	// ServiceMs is how long a generation holds a slot here (an EWMA; 0:
	// none observed yet).
	ServiceMs int64 `json:"service_ms"`
	// Claims counts the claims the engine has taken or queued since it
	// started: a replica knows its dispatches reached the node.
	Claims uint64 `json:"claims"`
}
