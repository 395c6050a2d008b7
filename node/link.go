package node

import (
	"errors"
	"slices"
	"time"
)

// The node link (DESIGN.md decisions 5, 10, 11; docs/node-link.md): every
// `llorch worker` serves its live state over authenticated HTTP at
// Inventory.LinkURL, so any apiserver replica can follow it without asking
// Temporal. It also serves each task's event stream (any replica follows
// it) and publishes each engine's slots as the node counts and queues them.
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

// Task streams on the link: the node keeps each task's events (started,
// metrics, token, then end or error) and any replica subscribes.
const (
	// LinkTasksPrefix starts the task routes: LinkTaskEventsPath and
	// LinkTaskCancelPath.
	LinkTasksPrefix = "/link/v1/tasks/"
	// LinkEventsAfterParam is the last token index the caller holds (-1 or
	// absent: from the start); LinkWaitParam bounds the wait for a task
	// the node does not hold yet (default LinkDefaultWait, at most
	// LinkMaxWait), after which it answers 404 CodeTaskNotOnNode.
	LinkEventsAfterParam = "after"
	// LinkKeepAlive is how often an idle event stream writes an empty line:
	// a subscriber that hears nothing for three of them takes the node for
	// gone (a partition leaves the TCP connection open), reads where the
	// task runs now and follows it there, seconds after its move.
	LinkKeepAlive = 2 * time.Second
	// LinkFlushInterval is how long an event stream holds back after a
	// write that carried tokens, so the tokens of a burst go out in one
	// write (one wakeup and syscall per hop for several tokens, not one
	// each). A token after a quiet spell, started and metrics go out at
	// once, and the final event is never held back.
	LinkFlushInterval = 5 * time.Millisecond
	// CodeTaskNotOnNode: the node holds no stream of the task (it never
	// ran here, or ended longer ago than the node keeps streams).
	CodeTaskNotOnNode = "TASK_NOT_ON_NODE"
)

// The fast start (docs/tasks.md, "The fast start"): the replica that admits
// a task sends its generation to the node of the granted slot while the
// task's workflow starts, so the first token waits for no Temporal round
// trip; the workflow's Generate activity attaches to it.
const (
	// LinkTaskGeneratePath (POST, body: the task.Request, its FastStart
	// naming this node) starts the generation: 202 once it is under way
	// (its events on LinkTaskEventsPath), 409 CodeGenerationExists when the
	// node runs or ran one of the task.
	LinkTaskGenerateSuffix = "/generate"
	// LinkFastStartClaim bounds how long a generation started ahead of its
	// workflow runs without its Generate activity: then the node cancels it
	// (a replica that died before the workflow started, a start that
	// failed). An activity that comes later resumes from what it produced.
	LinkFastStartClaim = 15 * time.Second
	// LinkMaxGenerateBody bounds the request body of LinkTaskGeneratePath.
	LinkMaxGenerateBody = 2 << 20
	// CodeGenerationExists: the node runs (or ran) a generation of the task.
	CodeGenerationExists = "GENERATION_EXISTS"
)

// Refusals of a fast start, as the node's generator returns them and the
// link answers them (409 CodeGenerationExists, 400).
var (
	ErrGenerationExists = errors.New("the node runs or ran a generation of this task")
	ErrNotThisNode      = errors.New("the fast start names no slot of this node")
)

// LinkTaskGeneratePath is where a task's generation is started ahead of
// its workflow.
func LinkTaskGeneratePath(taskID string) string {
	return LinkTasksPrefix + taskID + LinkTaskGenerateSuffix
}

// LinkTaskEventsPath streams a task's events as NDJSON (one task.Event per
// line, an empty line as keep-alive) until the final event.
func LinkTaskEventsPath(taskID string) string { return LinkTasksPrefix + taskID + "/events" }

// LinkTaskCancelPath (POST, optional body: the reason) ends the task's
// node stream with error CANCELED at once; the workflow's cancel stops the
// generation.
func LinkTaskCancelPath(taskID string) string { return LinkTasksPrefix + taskID + "/cancel" }

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
	// Prefixes are the prompt chain hashes the engine's slot caches hold
	// (package prefix), sorted: placement sends a task where its prompt's
	// longest prefix is.
	Prefixes []uint64 `json:"prefixes,omitempty"`
}

// Same says whether p and q are equal in every field.
func (p LinkPool) Same(q LinkPool) bool {
	return p.PoolID == q.PoolID && p.ModelID == q.ModelID && p.Epoch == q.Epoch && p.URL == q.URL &&
		p.Ready == q.Ready && p.SlotsTotal == q.SlotsTotal && p.SlotsBusy == q.SlotsBusy && p.Queued == q.Queued &&
		p.QueuedInteractive == q.QueuedInteractive && p.ServiceMs == q.ServiceMs && p.Claims == q.Claims &&
		slices.Equal(p.Prefixes, q.Prefixes)
}
