package apiserver

import (
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/bearer"
)

const localPrincipal = "principal"

// auth checks the bearer token (bearer.Key: constant time on digests).
func (s *Server) auth(c *fiber.Ctx) error {
	h := c.Get(fiber.HeaderAuthorization)
	r := s.key.Check(h)
	if r != nil && r.Code == bearer.CodeBad && s.deps.Keys != nil {
		if p, ok := s.deps.Keys.Lookup(bearerToken(h)); ok {
			c.Locals(localIdentity, p.Actor("").String())
			c.Locals(localPrincipal, p)
			bindActor(c)
			return c.Next()
		}
	}
	if r == nil {
		c.Locals(localIdentity, s.identity)
		c.Locals(localPrincipal, apikey.Bootstrap())
		bindActor(c)
		return c.Next()
	}
	s.metrics.authFailures.WithLabelValues(r.Code).Inc()
	if r.Presented != "" {
		s.log(c).Warn("rejected token", "presented", r.Presented)
	}
	return apiError(fiber.StatusUnauthorized, r.Code, "%s", r.Message)
}

// principalOf is who the request authenticated as (auth ran: every /v2 and
// /v1 route).
func principalOf(c *fiber.Ctx) apikey.Principal {
	p, _ := c.Locals(localPrincipal).(apikey.Principal)
	return p
}

// actorOf is who made the request, as audit events and memos name them.
func actorOf(c *fiber.Ctx) apikey.Actor {
	return principalOf(c).Actor(c.IP())
}

// bearerToken is the token of an Authorization header, "" when it is not
// a bearer credential.
func bearerToken(h string) string {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return tok
}
