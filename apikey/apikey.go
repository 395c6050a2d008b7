package apikey

import (
	"slices"
	"time"
)

// Scope is what a key may do.
type Scope string

const (
	// Admin: nodes, catalog, pools, staging, GC and keys; it also sees every
	// task and session.
	Admin Scope = "admin"
	// Inference: tasks, sessions and /v1; a key sees its own tasks only.
	Inference Scope = "inference"
	// Node: register and heartbeat one named node, push that node's streams.
	Node Scope = "node"
)

// Scopes are every scope, in the order docs and errors list them.
var Scopes = []Scope{Admin, Inference, Node}

// Valid says whether s is a known scope.
func (s Scope) Valid() bool { return slices.Contains(Scopes, s) }

// Limits are a key's quotas; 0 is unlimited.
type Limits struct {
	RequestsPerMinute int `json:"requests_per_minute,omitempty"`
	TokensPerMinute   int `json:"tokens_per_minute,omitempty"`
	ConcurrentTasks   int `json:"concurrent_tasks,omitempty"`
}

// None says whether no limit is set.
func (l Limits) None() bool { return l == Limits{} }

// BootstrapID is the key id of LLORCH_API_TOKEN, the bootstrap admin key,
// and of every call on a listener without a token (loopback only).
const BootstrapID = "bootstrap"

// Principal is who a request authenticated as.
type Principal struct {
	KeyID  string  `json:"key_id"`
	Name   string  `json:"name"`
	Scopes []Scope `json:"scopes"`
	// NodeID binds a node-scoped key to the one node it may act for.
	NodeID    string    `json:"node_id,omitempty"`
	Limits    Limits    `json:"limits,omitempty"`
	ExpiresAt time.Time `json:"expires_at,omitempty"`
}

// Bootstrap is the principal of LLORCH_API_TOKEN (or of an open, loopback
// listener): admin, unlimited.
func Bootstrap() Principal {
	return Principal{KeyID: BootstrapID, Name: "bootstrap", Scopes: []Scope{Admin}}
}

// Has says whether p holds scope s. Admin holds inference too: an operator
// may run tasks; it does not hold node, which names one node.
func (p Principal) Has(s Scope) bool {
	if slices.Contains(p.Scopes, s) {
		return true
	}
	return s == Inference && slices.Contains(p.Scopes, Admin)
}

// IsAdmin says whether p sees every task and session.
func (p Principal) IsAdmin() bool { return slices.Contains(p.Scopes, Admin) }

// Actor is who did something, as audit events and workflow memos name it.
type Actor struct {
	KeyID   string `json:"key_id"`
	KeyName string `json:"key_name"`
	Addr    string `json:"addr,omitempty"` // the caller's address
}

// Actor of p calling from addr.
func (p Principal) Actor(addr string) Actor {
	return Actor{KeyID: p.KeyID, KeyName: p.Name, Addr: addr}
}

// String is how logs and the Temporal UI show an actor: name (id).
func (a Actor) String() string {
	if a.KeyID == "" {
		return ""
	}
	return a.KeyName + " (" + a.KeyID + ")"
}

// MemoActor is the memo field naming who started or last changed a
// workflow through the API.
const MemoActor = "actor"

// MemoLastChange is the memo field naming the last change made through the
// API ("drain", "cancel", ...), next to MemoActor who made it.
const MemoLastChange = "last_change"
