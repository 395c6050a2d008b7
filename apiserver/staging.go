package apiserver

import (
	"context"
	"fmt"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// liveNode reads a node that can take work on its disk.
func (s *Server) liveNode(c *fiber.Ctx) (control.NodeView, error) {
	v, err := s.nodeParam(c)
	if err == nil && v.State == node.Left {
		err = notFound(c.Params("id"), control.ErrNodeLeft)
	}
	return v, err
}

// stageModel starts, or joins, the staging of a catalog model onto a node.
func (s *Server) stageModel(c *fiber.Ctx) error {
	mid := c.Params("model_id")
	if err := model.ValidateID(mid); err != nil {
		return invalidParam("model_id", "%v", err)
	}
	v, err := s.liveNode(c)
	if err != nil {
		return err
	}
	e, err := s.entry(c.UserContext(), mid)
	if err != nil {
		return err
	}
	if e.Lifecycle != model.Active {
		return apiError(fiber.StatusConflict, CodeModelRetired, "model %s is %s: only Active models are staged", mid, e.Lifecycle)
	}
	st, err := s.deps.Models.Stage(c.UserContext(), v.NodeID, e)
	if err != nil {
		return err
	}
	s.log(c).Info("staging requested", "node_id", v.NodeID, "model_id", mid, "workflow_id", st.WorkflowID, "run_id", st.RunID)
	return c.Status(fiber.StatusAccepted).JSON(fiber.Map{
		"node_id": v.NodeID, "model_id": mid, "sha256": e.SHA256, "size": e.Size,
		"workflow_id": st.WorkflowID, "run_id": st.RunID,
		"status_url": "/v2/nodes/" + v.NodeID + "/models",
	})
}

func (s *Server) nodeModels(c *fiber.Ctx) error {
	id, err := nodeID(c)
	if err != nil {
		return err
	}
	models, err := s.deps.Models.NodeModels(c.UserContext(), id)
	if err != nil {
		return notFound(id, err)
	}
	return c.JSON(fiber.Map{"node_id": id, "models": models, "at": time.Now().UTC()})
}

// runGC runs the node's GC now (or plans it, with ?dry_run=true) and returns
// what it deleted or would delete.
// gcWait is how long POST /v2/nodes/{id}/gc waits for the GC's result.
const gcWait = 10 * time.Second

func (s *Server) runGC(c *fiber.Ctx) error {
	v, err := s.liveNode(c)
	if err != nil {
		return err
	}
	dry := false
	if q := c.Query("dry_run"); q != "" {
		switch q {
		case "true", "1":
			dry = true
		case "false", "0":
		default:
			return invalidParam("dry_run", "want true or false, got %q", q)
		}
	}
	if v.State != node.Online && v.State != node.Draining {
		return apiError(fiber.StatusConflict, "NODE_NOT_ONLINE", "node %s is %s: GC runs on the node itself", v.NodeID, v.State)
	}
	// The GC is a workflow on the node, bounded by its activities' timeouts
	// (minutes on a busy node): the call waits gcWait for its result, then
	// answers 202 with the run to follow, which goes on (found by FuzzAPI: a
	// GC call stalled past 20 s under load).
	ctx, cancel := context.WithTimeout(c.UserContext(), gcWait)
	defer cancel()
	res, err := s.deps.Models.RunGC(ctx, v.NodeID, v.Inventory.GC, dry, nil)
	// The server may end the call on the deadline it was sent a moment
	// before ctx itself expires: a call that ended within a second of its
	// deadline ended on it.
	deadline, _ := ctx.Deadline()
	if err != nil && (ctx.Err() != nil || time.Until(deadline) < time.Second) && c.UserContext().Err() == nil {
		id := model.GCRunWorkflowID(v.NodeID, dry)
		return c.Status(fiber.StatusAccepted).JSON(fiber.Map{"node_id": v.NodeID, "dry_run": dry, "state": "running",
			"workflow_id": id, "message": fmt.Sprintf("GC still running after %s: follow workflow %s", gcWait, id)})
	}
	if err != nil {
		return err
	}
	evicted := res.Evicted
	if dry {
		evicted = res.Plan.Evictions
	}
	if evicted == nil {
		evicted = []model.Eviction{}
	}
	return c.JSON(fiber.Map{"node_id": v.NodeID, "dry_run": dry, "plan": res.Plan, "evicted": evicted})
}
