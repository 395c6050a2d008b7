package node

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"go.temporal.io/sdk/temporal"
)

// ControlTaskQueue is where every workflow runs (DESIGN.md decision 2): a
// workflow parked on a dead node's queue could never react to that death.
const ControlTaskQueue = "llorch.control"

// WorkflowType is the registered name of the node lifecycle workflow.
const WorkflowType = "Node"

// Signal, update and query names of the node workflow.
const (
	// SignalRegister carries a Registration; SignalWithStart uses it so that
	// racing registrations never make two workflows.
	SignalRegister = "register"
	// SignalAlive carries an Alive: proof that an agent serves the current
	// liveness session. Sent once per session, never once per beat.
	SignalAlive = "alive"
	// SignalSuspect carries a Suspicion: an apiserver lost the node's link.
	// The workflow confirms it through Temporal with a probe on the node's
	// queue; only an unanswered probe makes the node Offline.
	SignalSuspect = "suspect"

	UpdateDrain      = "drain"
	UpdateUndrain    = "undrain"
	UpdateDeregister = "deregister"

	QueryStatus = "status"
)

// Typed search attributes, so `NodeState="Offline"` lists dead nodes in the UI.
var (
	NodeIDKey    = temporal.NewSearchAttributeKeyKeyword("NodeId")
	NodeStateKey = temporal.NewSearchAttributeKeyKeyword("NodeState")
)

const workflowIDPrefix = "node:"

// WorkflowID is the readable id of a node's lifecycle workflow.
func WorkflowID(nodeID string) string { return workflowIDPrefix + nodeID }

// IDFromWorkflowID is the inverse of WorkflowID.
func IDFromWorkflowID(workflowID string) (string, bool) {
	id, ok := strings.CutPrefix(workflowID, workflowIDPrefix)
	return id, ok && id != ""
}

// TaskQueue is the per-node queue that only host-bound activities use.
func TaskQueue(nodeID string) string { return "node." + nodeID }

var idPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// ValidateID checks a node id: it becomes part of workflow ids, task queue
// names and metric labels, so it is short, lower case and punctuation-safe.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("node id %q is invalid: use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit", id)
	}
	return nil
}

// State is a node's lifecycle state. It is derived from facts the workflow
// holds (registered, connected, draining, left), never stored on its own.
type State string

const (
	Registering State = "Registering"
	Online      State = "Online"
	Draining    State = "Draining"
	Offline     State = "Offline"
	Left        State = "Left"
)

// States lists every state, in lifecycle order.
var States = []State{Registering, Online, Draining, Offline, Left}

// ParseState accepts a state name in any case.
func ParseState(s string) (State, error) {
	for _, st := range States {
		if strings.EqualFold(string(st), s) {
			return st, nil
		}
	}
	return "", fmt.Errorf("unknown node state %q (want one of registering, online, draining, offline, left)", s)
}

// Agent says how a node proves it is alive.
type Agent string

const (
	// AgentWorker is `llorch worker`: its liveness activity runs on the node's
	// own task queue and heartbeats through Temporal.
	AgentWorker Agent = "worker"
	// AgentHTTP is an external agent that registers and heartbeats over REST;
	// the apiserver records its heartbeats on a liveness activity by id.
	AgentHTTP Agent = "http"
)

// Application error types of node workflows and activities.
const (
	// ErrLeft: a request on a node that has left.
	ErrLeft = "NODE_LEFT"
	// ErrGone: a liveness session ends because the node workflow no longer
	// exists (deregistered).
	ErrGone = "NODE_GONE"
)

// Heartbeat bounds. Liveness times out after MissedBeats intervals.
//
// The heartbeat through Temporal is the slow, durable proof of life: every
// beat is a persisted write (about 3 ms of Temporal's CPU on the dev
// server), so the default is 10 s. A node that dies is noticed sooner by
// the apiservers following its link (its connections reset, or go silent
// past the keep-alive): they signal a Suspicion and the workflow's probe
// decides within ProbeTimeout (docs/node-link.md, "Liveness").
const (
	DefaultHeartbeatInterval = 10 * time.Second
	MinHeartbeatInterval     = 100 * time.Millisecond
	MaxHeartbeatInterval     = time.Minute
	MissedBeats              = 3
)

// LivenessTimeout is how long a node may stay silent before it is Offline.
func LivenessTimeout(interval time.Duration) time.Duration { return MissedBeats * interval }

// ProbeTimeout bounds a suspected node's probe: a worker polling its queue
// takes it within milliseconds, a loaded server within a second.
// Unanswered by then (not taken, or taken and not completed), the node is
// Offline.
const ProbeTimeout = 2 * time.Second

// ProbeInput asks a suspected node's worker to answer.
type ProbeInput struct {
	NodeID  string
	Session int
}

// Input starts a node workflow, or carries its state across continue-as-new.
type Input struct {
	NodeID string
	// Carried is the state of the previous run; nil on first start.
	Carried *Status
	// ContinueAsNewAfterEvents forces continue-as-new once history reaches
	// this many events; 0 leaves it to the server's suggestion. Tests set it
	// low to prove state survives the hand-over.
	ContinueAsNewAfterEvents int
	// LivenessLease bounds one liveness session; 0 means DefaultLivenessLease.
	LivenessLease time.Duration
	// Register is a registration that raced the previous run's
	// deregistration: the new run starts with it instead of losing it.
	Register *Registration
}

// DefaultLivenessLease is how long one liveness session lasts before the
// workflow starts the next one.
const DefaultLivenessLease = time.Hour

// LivenessInput starts one liveness session of a node.
type LivenessInput struct {
	NodeID   string
	Session  int
	Interval time.Duration
	// Lease bounds one session; the workflow starts the next when it ends, so
	// no activity outlives a worker build by much.
	Lease time.Duration
}
