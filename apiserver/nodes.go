package apiserver

import (
	"errors"
	"fmt"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
)

// nodeJSON is a node as the API shows it.
type nodeJSON struct {
	NodeID              string            `json:"node_id"`
	State               node.State        `json:"state"`
	Agent               node.Agent        `json:"agent,omitempty"`
	Identity            string            `json:"identity,omitempty"`
	Draining            bool              `json:"draining"`
	RegisteredAt        *time.Time        `json:"registered_at,omitempty"`
	LastSeen            *time.Time        `json:"last_seen,omitempty"`
	StateSince          *time.Time        `json:"state_since,omitempty"`
	HeartbeatIntervalMs int64             `json:"heartbeat_interval_ms"`
	LivenessTimeoutMs   int64             `json:"liveness_timeout_ms"`
	Inventory           node.Inventory    `json:"inventory"`
	Live                *liveJSON         `json:"live,omitempty"`
	Transitions         []node.Transition `json:"transitions"`
	Workflow            workflowJSON      `json:"workflow"`
}

type liveJSON struct {
	Source        string           `json:"source"` // heartbeat (live session) | last_report (registration or alive)
	At            time.Time        `json:"at"`
	AgeMs         int64            `json:"age_ms"`
	FreeVRAMBytes uint64           `json:"free_vram_bytes"`
	GPUs          []node.GPUUsage  `json:"gpus"`
	DiskFreeBytes uint64           `json:"disk_free_bytes"`
	Pools         []node.PoolSlots `json:"pools"`
}

type workflowJSON struct {
	ID    string `json:"id"`
	RunID string `json:"run_id,omitempty"`
	Runs  int    `json:"continued_as_new"`
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func render(v control.NodeView, now time.Time) nodeJSON {
	out := nodeJSON{
		NodeID: v.NodeID, State: v.State, Agent: v.Agent, Identity: v.Identity, Draining: v.Draining,
		RegisteredAt: timePtr(v.RegisteredAt), StateSince: timePtr(v.StateSince),
		HeartbeatIntervalMs: v.HeartbeatInterval.Milliseconds(),
		LivenessTimeoutMs:   node.LivenessTimeout(v.HeartbeatInterval).Milliseconds(),
		Inventory:           v.Inventory, Transitions: v.Transitions,
		Workflow: workflowJSON{ID: node.WorkflowID(v.NodeID), RunID: v.RunID, Runs: v.Runs},
	}
	if out.Transitions == nil {
		out.Transitions = []node.Transition{}
	}
	if out.Inventory.GPUs == nil {
		out.Inventory.GPUs = []node.GPU{}
	}
	lastSeen := v.LastSeen
	snap, at, source := v.LastSnapshot, v.LastSnapshot.At, "last_report"
	if v.Live != nil {
		snap, at, source = *v.Live, v.LastHeartbeat, "heartbeat"
	}
	if at.After(lastSeen) {
		lastSeen = at
	}
	out.LastSeen = timePtr(lastSeen)
	if !at.IsZero() {
		out.Live = &liveJSON{Source: source, At: at, AgeMs: now.Sub(at).Milliseconds(),
			FreeVRAMBytes: snap.FreeVRAMBytes(), GPUs: snap.GPUs, DiskFreeBytes: snap.DiskFreeBytes, Pools: snap.Pools}
		if out.Live.GPUs == nil {
			out.Live.GPUs = []node.GPUUsage{}
		}
		if out.Live.Pools == nil {
			out.Live.Pools = []node.PoolSlots{}
		}
	}
	return out
}

func (s *Server) listNodes(c *fiber.Ctx) error {
	var want node.State
	if q := c.Query("state"); q != "" {
		st, err := node.ParseState(q)
		if err != nil {
			return invalidParam("state", "%v", err)
		}
		want = st
	}
	views, err := s.deps.Nodes.List(c.UserContext())
	if err != nil {
		return err
	}
	now := time.Now()
	out := []nodeJSON{}
	for _, v := range views {
		if want == "" || v.State == want {
			out = append(out, render(v, now))
		}
	}
	return c.JSON(fiber.Map{"nodes": out, "count": len(out)})
}

func nodeID(c *fiber.Ctx) (string, error) { return idParam(c, node.ValidateID) }

func notFound(id string, err error) error {
	switch {
	case errors.Is(err, control.ErrNodeNotFound):
		return apiError(fiber.StatusNotFound, CodeNodeNotFound, "node %s is not registered", id)
	case errors.Is(err, control.ErrNodeLeft):
		return apiError(fiber.StatusConflict, CodeNodeLeft, "node %s has left the cluster; register it again to bring it back", id)
	case errors.Is(err, control.ErrAgentManaged):
		return apiError(fiber.StatusConflict, CodeAgentManaged,
			"node %s is run by an llorch worker, which heartbeats through Temporal; REST heartbeats are for nodes registered over REST", id)
	}
	return err
}

// nodeParam reads the node named by :id.
func (s *Server) nodeParam(c *fiber.Ctx) (control.NodeView, error) {
	id, err := nodeID(c)
	if err != nil {
		return control.NodeView{}, err
	}
	v, err := s.deps.Nodes.Get(c.UserContext(), id)
	if err != nil {
		return v, notFound(id, err)
	}
	return v, nil
}

func (s *Server) getNode(c *fiber.Ctx) error {
	v, err := s.nodeParam(c)
	if err != nil {
		return err
	}
	return c.JSON(render(v, time.Now()))
}

// registerRequest is the body of POST /v2/nodes/register (an external agent).
type registerRequest struct {
	NodeID              string           `json:"node_id"`
	MachineID           string           `json:"machine_id"`
	Address             string           `json:"address"`
	GPUs                []node.GPU       `json:"gpus"`
	DriverVersion       string           `json:"driver_version"`
	CPUCores            int              `json:"cpu_cores"`
	MemoryTotalBytes    uint64           `json:"memory_total_bytes"`
	DiskFreeBytes       uint64           `json:"disk_free_bytes"`
	Version             string           `json:"version"`
	HeartbeatIntervalMs int64            `json:"heartbeat_interval_ms"`
	Pools               []node.PoolSlots `json:"pools"`
}

func validateGPUs(gpus []node.GPU) error {
	usage := make([]node.GPUUsage, len(gpus))
	for i, g := range gpus {
		if len(g.Name) > 256 || len(g.UUID) > 128 {
			return invalidParam(fmt.Sprintf("gpus[%d]", i), "name or uuid too long")
		}
		usage[i] = node.GPUUsage{Index: g.Index, MemoryTotalBytes: g.MemoryTotalBytes,
			MemoryFreeBytes: g.MemoryFreeBytes, UtilizationPercent: g.UtilizationPercent}
	}
	return validateUsage(usage)
}

// validateUsage checks the figures registrations and heartbeats share.
func validateUsage(gpus []node.GPUUsage) error {
	seen := map[int]bool{}
	for i, g := range gpus {
		f := fmt.Sprintf("gpus[%d]", i)
		switch {
		case g.Index < 0 || seen[g.Index]:
			return invalidParam(f+".index", "must be a unique index >= 0")
		case g.MemoryFreeBytes > g.MemoryTotalBytes:
			return invalidParam(f+".memory_free_bytes", "exceeds memory_total_bytes")
		case g.UtilizationPercent > 100:
			return invalidParam(f+".utilization_percent", "must be 0-100")
		}
		seen[g.Index] = true
	}
	return nil
}

func validatePools(pools []node.PoolSlots) error {
	for i, p := range pools {
		f := fmt.Sprintf("pools[%d]", i)
		switch {
		case p.PoolID == "" || len(p.PoolID) > 128:
			return invalidParam(f+".pool_id", "required, at most 128 characters")
		case p.SlotsTotal < 0 || p.SlotsFree < 0 || p.SlotsFree > p.SlotsTotal:
			return invalidParam(f+".slots_free", "must be between 0 and slots_total")
		}
	}
	return nil
}

func (s *Server) registerNode(c *fiber.Ctx) error {
	var req registerRequest
	if err := decode(c, &req, false); err != nil {
		return err
	}
	if err := node.ValidateID(req.NodeID); err != nil {
		return invalidParam("node_id", "%v", err)
	}
	if err := actsFor(c, req.NodeID); err != nil {
		return err
	}
	interval := time.Duration(req.HeartbeatIntervalMs) * time.Millisecond
	if req.HeartbeatIntervalMs == 0 {
		interval = 10 * time.Second // the original plan's heartbeat
	}
	if interval < node.MinHeartbeatInterval || interval > node.MaxHeartbeatInterval {
		return invalidParam("heartbeat_interval_ms", "must be between %d and %d",
			node.MinHeartbeatInterval.Milliseconds(), node.MaxHeartbeatInterval.Milliseconds())
	}
	if err := validateGPUs(req.GPUs); err != nil {
		return err
	}
	if err := validatePools(req.Pools); err != nil {
		return err
	}
	if req.CPUCores < 0 {
		return invalidParam("cpu_cores", "must be >= 0")
	}
	inv := node.Inventory{
		MachineID: req.MachineID, Address: req.Address, GPUs: req.GPUs, DriverVersion: req.DriverVersion,
		CPUOnly: len(req.GPUs) == 0, CPUCores: req.CPUCores, MemoryTotalBytes: req.MemoryTotalBytes,
		DiskFreeBytes: req.DiskFreeBytes, Version: req.Version, CollectedAt: time.Now().UTC(),
	}
	err := s.deps.Nodes.Register(c.UserContext(), node.Registration{
		NodeID: req.NodeID, Agent: node.AgentHTTP, Identity: identity(c),
		HeartbeatInterval: interval, Inventory: inv, Pools: req.Pools,
	})
	if err != nil {
		return err
	}
	s.log(c).Info("node registered over REST", "node_id", req.NodeID, "gpus", len(req.GPUs))
	return c.Status(fiber.StatusAccepted).JSON(fiber.Map{
		"node_id":               req.NodeID,
		"workflow_id":           node.WorkflowID(req.NodeID),
		"heartbeat_interval_ms": interval.Milliseconds(),
		"liveness_timeout_ms":   node.LivenessTimeout(interval).Milliseconds(),
	})
}

// heartbeatRequest is the body of POST /v2/nodes/{id}/heartbeat.
type heartbeatRequest struct {
	GPUs          []node.GPUUsage  `json:"gpus"`
	DiskFreeBytes uint64           `json:"disk_free_bytes"`
	Pools         []node.PoolSlots `json:"pools"`
}

func (s *Server) heartbeatNode(c *fiber.Ctx) error {
	var req heartbeatRequest
	id, err := idAndBody(c, nodeID, &req, true)
	if err != nil {
		return err
	}
	if err := validateUsage(req.GPUs); err != nil {
		return err
	}
	if err := validatePools(req.Pools); err != nil {
		return err
	}
	snap := node.Snapshot{At: time.Now().UTC(), GPUs: req.GPUs, DiskFreeBytes: req.DiskFreeBytes, Pools: req.Pools}
	st, err := s.deps.Nodes.Heartbeat(c.UserContext(), id, identity(c), snap)
	if err != nil {
		return notFound(id, err)
	}
	s.metrics.heartbeats.WithLabelValues(id).Inc()
	return c.JSON(fiber.Map{
		"node_id":         id,
		"revived":         !st.Connected,
		"next_beat_in_ms": st.HeartbeatInterval.Milliseconds(),
	})
}

type changeRequest struct {
	Reason string `json:"reason"`
}

func (s *Server) updateNode(name string) fiber.Handler {
	return func(c *fiber.Ctx) error {
		var req changeRequest
		id, err := idAndBody(c, nodeID, &req, true)
		if err != nil {
			return err
		}
		if len(req.Reason) > node.MaxReasonLen {
			return invalidParam("reason", "at most %d characters", node.MaxReasonLen)
		}
		st, err := s.deps.Nodes.Update(c.UserContext(), id, name, node.Request{Reason: req.Reason, Identity: identity(c)})
		if err != nil {
			return notFound(id, err)
		}
		s.log(c).Info("node "+name, "node_id", id, "state", st.State)
		return c.JSON(render(control.NodeView{Status: st}, time.Now()))
	}
}

func (s *Server) deregisterNode(c *fiber.Ctx) error { return s.updateNode(node.UpdateDeregister)(c) }
