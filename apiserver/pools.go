package apiserver

import (
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/scheduler"
)

// Pool error codes.
const (
	CodePoolNotFound = "POOL_NOT_FOUND"
	CodePoolExists   = "POOL_EXISTS"
	CodePoolEnded    = "POOL_ENDED"
	CodeNoNode       = "NO_NODE_AVAILABLE"
	CodePoolBusy     = "POOL_BUSY"
	CodeReloadFailed = "RELOAD_FAILED"
)

// maxDrainMs bounds a drain's deadline_ms: 24 h.
const maxDrainMs = int64(24 * time.Hour / time.Millisecond)

// maxGPUs bounds the GPU indexes a device mask may name.
const maxGPUs = 64

// parseDeviceMask checks a pool's device_mask (CUDA_VISIBLE_DEVICES):
// distinct GPU indexes 0-63, comma-separated, no spaces; "" is none.
func parseDeviceMask(mask string) ([]int, error) {
	if mask == "" {
		return nil, nil
	}
	parts := strings.Split(mask, ",")
	if len(parts) > maxGPUs {
		return nil, invalidParam("device_mask", "at most %d GPUs", maxGPUs)
	}
	seen := map[int]bool{}
	out := make([]int, 0, len(parts))
	for _, f := range parts {
		idx, err := strconv.Atoi(f)
		if err != nil || idx < 0 || idx >= maxGPUs || strconv.Itoa(idx) != f {
			return nil, invalidParam("device_mask", "want comma-separated GPU indexes 0-%d (e.g. \"0,1\"), got %q", maxGPUs-1, mask)
		}
		if seen[idx] {
			return nil, invalidParam("device_mask", "GPU %d named twice in %q", idx, mask)
		}
		seen[idx] = true
		out = append(out, idx)
	}
	return out, nil
}

// reloadWait is how long a reload request waits for its mode to be known.
const reloadWait = 30 * time.Second

type createPoolRequest struct {
	PoolID     string `json:"pool_id"`
	ModelID    string `json:"model_id"`
	NodeID     string `json:"node_id"`
	Engine     string `json:"engine"`
	DeviceMask string `json:"device_mask"`
	Ctx        int    `json:"ctx"`
	Slots      int    `json:"slots"`
	NGPULayers int    `json:"n_gpu_layers"`
	Embeddings bool   `json:"embeddings"` // serve embeddings, no generations
}

func (s *Server) createPool(c *fiber.Ctx) error {
	var req createPoolRequest
	if err := decode(c, &req, false); err != nil {
		return err
	}
	if err := pool.ValidateID(req.PoolID); err != nil {
		return invalidParam("pool_id", "%v", err)
	}
	if err := model.ValidateID(req.ModelID); err != nil {
		return invalidParam("model_id", "%v", err)
	}
	engine := pool.Engine(req.Engine)
	switch engine {
	case "":
		engine = pool.Builtin
	case pool.Builtin, pool.LlamaServer:
	default:
		return invalidParam("engine", "want builtin or llama-server, got %q", req.Engine)
	}
	if req.Slots == 0 {
		req.Slots = 1
	}
	if req.Slots < 1 || req.Slots > 256 {
		return invalidParam("slots", "must be 1-256")
	}
	if req.Ctx < 0 || req.NGPULayers < -1 {
		return invalidParam("ctx", "ctx must be >= 0 and n_gpu_layers >= -1")
	}
	gpus, err := parseDeviceMask(req.DeviceMask)
	if err != nil {
		return err
	}
	if err := s.activeEntry(c.UserContext(), req.ModelID); err != nil {
		return err
	}
	nodeID := req.NodeID
	if nodeID != "" {
		if err := node.ValidateID(nodeID); err != nil {
			return invalidParam("node_id", "%v", err)
		}
		v, err := s.deps.Nodes.Get(c.UserContext(), nodeID)
		if err != nil {
			return notFound(nodeID, err)
		}
		if v.State != node.Online {
			return apiError(fiber.StatusConflict, "NODE_NOT_ONLINE", "node %s is %s: pools start on Online nodes", nodeID, v.State)
		}
		// A named node's GPUs are known: the mask names only those. (A
		// node picked below checks its own at start: INSUFFICIENT_VRAM.)
		have := map[int]bool{}
		for _, g := range v.Inventory.GPUs {
			have[g.Index] = true
		}
		for _, idx := range gpus {
			if !have[idx] {
				return invalidParam("device_mask", "node %s has no GPU %d (it has %d GPUs)", nodeID, idx, len(v.Inventory.GPUs))
			}
		}
	} else {
		var err error
		if nodeID, err = scheduler.NodeForPool(c.UserContext(), s.deps.Nodes); err != nil {
			return err
		}
		if nodeID == "" {
			return apiError(fiber.StatusServiceUnavailable, CodeNoNode, "no Online node to place pool %s on", req.PoolID)
		}
	}
	spec := pool.Spec{PoolID: req.PoolID, NodeID: nodeID, ModelID: req.ModelID, Engine: engine,
		DeviceMask: req.DeviceMask, CtxSize: req.Ctx, Slots: req.Slots, NGPULayers: req.NGPULayers, Embeddings: req.Embeddings}
	run, err := s.deps.Pools.Create(c.UserContext(), spec)
	if errors.Is(err, control.ErrPoolExists) {
		return apiError(fiber.StatusConflict, CodePoolExists, "pool %s exists", req.PoolID)
	}
	if err != nil {
		return err
	}
	s.log(c).Info("pool created", "pool_id", spec.PoolID, "node_id", nodeID, "model_id", spec.ModelID)
	return c.Status(fiber.StatusAccepted).JSON(fiber.Map{"pool": spec, "workflow_id": pool.WorkflowID(nodeID, spec.PoolID), "run_id": run,
		"health_url": "/v2/pools/" + spec.PoolID + "/health"})
}

func (s *Server) listPools(c *fiber.Ctx) error {
	pools, err := s.deps.Pools.List(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(fiber.Map{"pools": pools, "count": len(pools)})
}

func poolID(c *fiber.Ctx) (string, error) { return idParam(c, pool.ValidateID) }

func poolErr(id string, err error) error {
	switch {
	case errors.Is(err, control.ErrPoolNotFound):
		return apiError(fiber.StatusNotFound, CodePoolNotFound, "pool %s does not exist", id)
	case errors.Is(err, control.ErrPoolEnded):
		return apiError(fiber.StatusConflict, CodePoolEnded, "pool %s has ended", id)
	case errors.Is(err, control.ErrPoolBusy):
		return apiError(fiber.StatusConflict, CodePoolBusy, "%v", err)
	}
	return err
}

func (s *Server) poolHealth(c *fiber.Ctx) error {
	id, err := poolID(c)
	if err != nil {
		return err
	}
	h, err := s.deps.Pools.Health(c.UserContext(), id)
	if err != nil {
		return poolErr(id, err)
	}
	return c.JSON(h)
}

func (s *Server) drainPool(c *fiber.Ctx) error {
	var req pool.DrainRequest
	id, err := idAndBody(c, poolID, &req, true)
	if err != nil {
		return err
	}
	// The workflow makes it a time.Duration: bounded before it overflows.
	if req.DeadlineMs < 0 || req.DeadlineMs > maxDrainMs {
		return invalidParam("deadline_ms", "must be 0-%d (24 h)", maxDrainMs)
	}
	req.Identity = identity(c)
	h, err := s.deps.Pools.Drain(c.UserContext(), id, req)
	if err != nil {
		return poolErr(id, err)
	}
	s.log(c).Info("pool drained", "pool_id", id, "state", h.State)
	return c.JSON(h)
}

type reloadRequest struct {
	ModelID    string `json:"model_id"`
	DeadlineMs int64  `json:"deadline_ms"`
}

// reloadPool switches a pool to another model. It answers 202 once the mode
// is known: side-by-side (the old engine serves until the new one is
// ready, and keeps serving if it fails) or drain-first (no room for both:
// the old engine is drained first); the switch is followed in the pool's
// health (reload).
func (s *Server) reloadPool(c *fiber.Ctx) error {
	var req reloadRequest
	id, err := idAndBody(c, poolID, &req, false)
	if err != nil {
		return err
	}
	if err := model.ValidateID(req.ModelID); err != nil {
		return invalidParam("model_id", "%v", err)
	}
	if req.DeadlineMs < 0 || req.DeadlineMs > int64(time.Hour/time.Millisecond) {
		return invalidParam("deadline_ms", "must be 0-3600000")
	}
	if err := s.activeEntry(c.UserContext(), req.ModelID); err != nil {
		return err
	}
	st, err := s.deps.Pools.Reload(c.UserContext(), id,
		pool.ReloadRequest{ModelID: req.ModelID, DeadlineMs: req.DeadlineMs, Identity: identity(c)}, reloadWait)
	if err != nil {
		return poolErr(id, err)
	}
	msg := ""
	switch {
	case st.Step == "failed":
		msg = "reload failed: " + st.Error
	case st.Mode == pool.SideBySide:
		msg = "the new engine starts beside the serving one, which serves until the switch"
	case st.Mode == pool.DrainFirst:
		msg = "no room for both engines on node: draining the serving engine first, then starting the new one"
	case st.Mode == pool.Replace:
		msg = "no engine was serving: the next start uses the new model"
	default:
		msg = "reload in progress (" + st.Step + "): follow it in the pool's health"
	}
	s.log(c).Info("pool reload", "pool_id", id, "model_id", req.ModelID, "mode", st.Mode, "step", st.Step, "error", st.Error)
	if st.Step == "failed" {
		return apiError(fiber.StatusConflict, CodeReloadFailed, "pool %s: %s; it keeps its model %s", id, msg, st.FromModel)
	}
	return c.Status(fiber.StatusAccepted).JSON(fiber.Map{"reload": st, "message": msg, "health_url": "/v2/pools/" + id + "/health"})
}
