package apiserver

import (
	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/tokenstream"
)

// routes are every route of the API, in one table. The task routes, the
// OpenAI-compatible ones and the token stream sink need a scheduler and a
// hub.
func (s *Server) routes() {
	reg := s.deps.Registry
	s.app.Get("/health", s.health)
	s.app.Get("/metrics", adaptor.HTTPHandler(promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})))

	// Every /v2 and /v1 route names the scope it needs (see
	// docs/security.md): admin for the cluster, inference for tasks,
	// sessions and /v1, node (or admin) for one node's registration and
	// heartbeat.
	v2 := s.app.Group("/v2", s.auth)
	admin, inference, nodeOrAdmin := need(apikey.Admin), need(apikey.Inference), needNode
	v2.Get("/nodes", admin, s.listNodes)
	v2.Post("/nodes/register", nodeOrAdmin, s.registerNode) // the body's node_id is checked
	v2.Get("/nodes/:id", admin, s.getNode)
	v2.Delete("/nodes/:id", admin, s.deregisterNode)
	v2.Post("/nodes/:id/heartbeat", nodeOrAdmin, s.actsForParam, s.heartbeatNode)
	v2.Post("/nodes/:id/drain", admin, s.updateNode(node.UpdateDrain))
	v2.Post("/nodes/:id/undrain", admin, s.updateNode(node.UpdateUndrain))
	v2.Post("/nodes/:id/models/:model_id", admin, s.stageModel)
	v2.Get("/nodes/:id/models", admin, s.nodeModels)
	v2.Post("/nodes/:id/gc", admin, s.runGC)

	v2.Get("/catalog/models", admin, s.listModels)
	v2.Post("/catalog/models", admin, s.registerModel)
	v2.Get("/catalog/models/:id", admin, s.getModel)
	v2.Delete("/catalog/models/:id", admin, s.deleteModel)
	v2.Post("/catalog/models/:id/state", admin, s.setModelState)
	v2.Post("/catalog/models/:id/verify", admin, s.verifyModel)
	v2.Get("/catalog/availability", admin, s.availability)

	v2.Post("/pools", admin, s.createPool)
	v2.Get("/pools", admin, s.listPools)
	v2.Get("/pools/:id/health", admin, s.poolHealth)
	v2.Post("/pools/:id/drain", admin, s.drainPool)
	v2.Post("/pools/:id/reload", admin, s.reloadPool)

	if s.deps.KeyRegistry != nil {
		v2.Post("/keys", admin, s.createKey)
		v2.Get("/keys", admin, s.listKeys)
		v2.Get("/keys/:id", admin, s.getKey)
		v2.Delete("/keys/:id", admin, s.revokeKey)
	}

	v2.Get("/keys/:id/usage", s.keyUsage) // admin, or the key itself

	if s.deps.Scheduler != nil && s.deps.Hub != nil {
		v2.Post("/tasks", inference, s.createTask)
		v2.Get("/tasks", inference, s.listTasks)
		v2.Get("/tasks/:id", inference, s.getTask)
		v2.Get("/tasks/:id/events", inference, s.taskEvents)
		v2.Post("/tasks/:id/cancel", inference, s.cancelTask)
		v2.Get("/sessions/:id", inference, s.getSession)
		v2.Delete("/sessions/:id", inference, s.deleteSession)

		// OpenAI's API: errors in OpenAI's shape, the same tasks
		// underneath. A client that leaves a stream cancels its task.
		// auth runs the rest of the chain: the scope's refusal and the
		// handlers' errors come back through it, in OpenAI's shape.
		v1 := s.app.Group("/v1", func(c *fiber.Ctx) error {
			if err := s.auth(c); err != nil {
				return s.openAIError(c, err)
			}
			return nil
		}, inference)
		v1.Post("/chat/completions", s.chatCompletions)
		v1.Post("/completions", s.completions)
		v1.Post("/responses", s.responses)
		v1.Get("/models", s.openAIModels)
		v1.Get("/models/:id", s.openAIModel)

		// Authenticated by the task's stream credential (a node's push
		// for a task it runs), not by an API key.
		s.app.Post(tokenstream.PushPath(":id"), s.pushEvents)
	}

	s.app.Use(func(c *fiber.Ctx) error {
		return apiError(fiber.StatusNotFound, CodeNotFound, "no route %s %s", c.Method(), c.Path())
	})
}
