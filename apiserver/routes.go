package apiserver

import (
	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/prometheus/client_golang/prometheus/promhttp"

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

	v2 := s.app.Group("/v2", s.auth)
	v2.Get("/nodes", s.listNodes)
	v2.Post("/nodes/register", s.registerNode)
	v2.Get("/nodes/:id", s.getNode)
	v2.Delete("/nodes/:id", s.deregisterNode)
	v2.Post("/nodes/:id/heartbeat", s.heartbeatNode)
	v2.Post("/nodes/:id/drain", s.updateNode(node.UpdateDrain))
	v2.Post("/nodes/:id/undrain", s.updateNode(node.UpdateUndrain))
	v2.Post("/nodes/:id/models/:model_id", s.stageModel)
	v2.Get("/nodes/:id/models", s.nodeModels)
	v2.Post("/nodes/:id/gc", s.runGC)

	v2.Get("/catalog/models", s.listModels)
	v2.Post("/catalog/models", s.registerModel)
	v2.Get("/catalog/models/:id", s.getModel)
	v2.Delete("/catalog/models/:id", s.deleteModel)
	v2.Post("/catalog/models/:id/state", s.setModelState)
	v2.Post("/catalog/models/:id/verify", s.verifyModel)
	v2.Get("/catalog/availability", s.availability)

	v2.Post("/pools", s.createPool)
	v2.Get("/pools", s.listPools)
	v2.Get("/pools/:id/health", s.poolHealth)
	v2.Post("/pools/:id/drain", s.drainPool)
	v2.Post("/pools/:id/reload", s.reloadPool)

	v2.Get("/keys/:id/usage", s.keyUsage) // admin, or the key itself

	if s.deps.Scheduler != nil && s.deps.Hub != nil {
		v2.Post("/tasks", s.createTask)
		v2.Get("/tasks/:id", s.getTask)
		v2.Get("/tasks/:id/events", s.taskEvents)
		v2.Post("/tasks/:id/cancel", s.cancelTask)
		v2.Get("/sessions/:id", s.getSession)
		v2.Delete("/sessions/:id", s.deleteSession)

		// OpenAI's API: errors in OpenAI's shape, the same tasks
		// underneath. A client that leaves a stream cancels its task.
		v1 := s.app.Group("/v1", func(c *fiber.Ctx) error {
			if err := s.auth(c); err != nil {
				return s.openAIError(c, err)
			}
			return nil
		})
		v1.Post("/chat/completions", s.chatCompletions)
		v1.Post("/completions", s.completions)
		v1.Get("/models", s.openAIModels)

		s.app.Post(tokenstream.PushPath(":id"), s.pushEvents)
	}

	s.app.Use(func(c *fiber.Ctx) error {
		return apiError(fiber.StatusNotFound, CodeNotFound, "no route %s %s", c.Method(), c.Path())
	})
}
