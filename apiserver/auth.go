package apiserver

import (
	"github.com/gofiber/fiber/v2"
)

// auth checks the bearer token (bearer.Key: constant time on digests).
func (s *Server) auth(c *fiber.Ctx) error {
	r := s.key.Check(c.Get(fiber.HeaderAuthorization))
	if r == nil {
		c.Locals(localIdentity, s.identity)
		return c.Next()
	}
	s.metrics.authFailures.WithLabelValues(r.Code).Inc()
	if r.Presented != "" {
		s.log(c).Warn("rejected token", "presented", r.Presented)
	}
	return apiError(fiber.StatusUnauthorized, r.Code, "%s", r.Message)
}
