package node

import (
	"strconv"
	"time"

	"github.com/llorch/llorch/apikey"
)

// GPU is one device as NVML reports it.
type GPU struct {
	Index              int    `json:"index"`
	UUID               string `json:"uuid"`
	Name               string `json:"name"`
	MemoryTotalBytes   uint64 `json:"memory_total_bytes"`
	MemoryFreeBytes    uint64 `json:"memory_free_bytes"`
	UtilizationPercent uint32 `json:"utilization_percent"`
	ComputeCapability  string `json:"compute_capability"`
}

// Inventory is what a node has, collected when it registers.
type Inventory struct {
	MachineID        string    `json:"machine_id,omitempty"`
	Hostname         string    `json:"hostname,omitempty"`
	Address          string    `json:"address,omitempty"`
	LinkURL          string    `json:"link_url,omitempty"` // where the node link serves (node/link.go); "" without one
	GPUs             []GPU     `json:"gpus"`
	DriverVersion    string    `json:"driver_version,omitempty"`
	CPUOnly          bool      `json:"cpu_only"`
	NVMLError        string    `json:"nvml_error,omitempty"`
	CPUCores         int       `json:"cpu_cores"`
	MemoryTotalBytes uint64    `json:"memory_total_bytes"`
	ModelDir         string    `json:"model_dir,omitempty"`
	DiskFreeBytes    uint64    `json:"disk_free_bytes"`
	Version          string    `json:"version,omitempty"`
	CollectedAt      time.Time `json:"collected_at"`
	// GC is the node's disk policy for its model catalog.
	GC GCPolicy `json:"gc"`
}

// GCPolicy bounds the disk a node's models may use. Usage is the bytes of
// the local catalog (verified files and partial downloads); the budget is
// BudgetBytes, or usage plus free space when 0. GC starts above
// HighWatermark x budget and evicts down to LowWatermark x budget.
type GCPolicy struct {
	BudgetBytes   int64         `json:"budget_bytes"`
	HighWatermark float64       `json:"high_watermark"`
	LowWatermark  float64       `json:"low_watermark"`
	PartialMaxAge time.Duration `json:"partial_max_age"`
}

// Summary is the one-line description shown in the Temporal UI.
func (inv Inventory) Summary(nodeID string) string {
	if len(inv.GPUs) == 0 {
		return "node " + nodeID + " · CPU only"
	}
	return "node " + nodeID + " · " + strconv.Itoa(len(inv.GPUs)) + "× " + inv.GPUs[0].Name
}

// PoolSlots is a pool's slot figures as the node sees them.
type PoolSlots struct {
	PoolID     string `json:"pool_id"`
	Ready      bool   `json:"ready"`
	SlotsTotal int    `json:"slots_total"`
	SlotsFree  int    `json:"slots_free"`
}

// GPUUsage is the part of a GPU that changes between beats.
type GPUUsage struct {
	Index              int    `json:"index"`
	MemoryTotalBytes   uint64 `json:"memory_total_bytes"`
	MemoryFreeBytes    uint64 `json:"memory_free_bytes"`
	UtilizationPercent uint32 `json:"utilization_percent"`
}

// ModelCopy is a verified model file held in a node's local catalog.
type ModelCopy struct {
	ModelID  string    `json:"model_id"`
	SHA256   string    `json:"sha256"`
	Size     int64     `json:"size"`
	StagedAt time.Time `json:"staged_at"`
	LastUsed time.Time `json:"last_used"`
}

// Snapshot is what a heartbeat carries. It travels as activity heartbeat
// details, so it never enters workflow history.
type Snapshot struct {
	At            time.Time   `json:"at"`
	GPUs          []GPUUsage  `json:"gpus"`
	DiskFreeBytes uint64      `json:"disk_free_bytes"`
	Pools         []PoolSlots `json:"pools"`
	// Models is the node's local catalog; ModelBytes their total size.
	Models     []ModelCopy `json:"models,omitempty"`
	ModelBytes uint64      `json:"model_bytes,omitempty"`
}

// FreeVRAMBytes sums free memory over all GPUs.
func (s Snapshot) FreeVRAMBytes() uint64 {
	var sum uint64
	for _, g := range s.GPUs {
		sum += g.MemoryFreeBytes
	}
	return sum
}

// Registration is the payload of SignalRegister.
type Registration struct {
	NodeID   string `json:"node_id"`
	Agent    Agent  `json:"agent"`
	Identity string `json:"identity"` // worker identity or API caller identity
	// Actor is the API caller of a registration over REST (nil from a
	// worker, and in payloads sent before audit): the memo names it.
	Actor             *apikey.Actor `json:"actor,omitempty"`
	HeartbeatInterval time.Duration `json:"heartbeat_interval"`
	Inventory         Inventory     `json:"inventory"`
	Pools             []PoolSlots   `json:"pools"`
}

// Alive is the payload of SignalAlive.
type Alive struct {
	Session  int      `json:"session"`
	Identity string   `json:"identity"`
	Snapshot Snapshot `json:"snapshot"`
}

// Suspicion is the payload of SignalSuspect: who lost the node's link and
// how.
type Suspicion struct {
	By     string `json:"by"` // the apiserver's identity
	Reason string `json:"reason"`
}

// Transition is one state change with its reason, kept for the UI and API.
type Transition struct {
	From   State     `json:"from"`
	To     State     `json:"to"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// Status is the node workflow's view of a node (QueryStatus, and the result
// of a finished workflow).
type Status struct {
	NodeID             string        `json:"node_id"`
	State              State         `json:"state"`
	Agent              Agent         `json:"agent"`
	Identity           string        `json:"identity,omitempty"`
	HeartbeatInterval  time.Duration `json:"heartbeat_interval"`
	Inventory          Inventory     `json:"inventory"`
	Draining           bool          `json:"draining"`
	Connected          bool          `json:"connected"`
	RegisteredAt       time.Time     `json:"registered_at"`
	LastSeen           time.Time     `json:"last_seen"`
	StateSince         time.Time     `json:"state_since"`
	Session            int           `json:"session"`
	LivenessActivityID string        `json:"liveness_activity_id,omitempty"`
	LastSnapshot       Snapshot      `json:"last_snapshot"`
	Transitions        []Transition  `json:"transitions"`
	Runs               int           `json:"runs"` // continue-as-new generations so far
	// Suspicions counts apiservers' reports of a lost link that the node's
	// probe answered (the node was alive: a network problem between them).
	Suspicions int `json:"suspicions"`
}

// MaxTransitions bounds the transition log carried across continue-as-new.
const MaxTransitions = 20

// Request is the argument of the drain, undrain and deregister updates.
type Request struct {
	Reason   string `json:"reason,omitempty"`
	Identity string `json:"identity,omitempty"`
	// Actor is who asked, for the workflow's memo (nil in requests sent
	// before audit, and from no API caller).
	Actor *apikey.Actor `json:"actor,omitempty"`
}

// MaxReasonLen bounds a free-text reason.
const MaxReasonLen = 512
