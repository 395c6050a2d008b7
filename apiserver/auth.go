package apiserver

import (
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/tokenstream"
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

// need refuses a caller whose key lacks scope (admin holds inference too).
func need(scope apikey.Scope) fiber.Handler {
	return func(c *fiber.Ctx) error {
		if !principalOf(c).Has(scope) {
			return forbidden(scope)
		}
		return c.Next()
	}
}

// needNode lets through an admin or a node key; the handler then checks
// the node is the key's (actsFor).
func needNode(c *fiber.Ctx) error {
	p := principalOf(c)
	if !p.IsAdmin() && !p.Has(apikey.Node) {
		return forbidden(apikey.Node)
	}
	return c.Next()
}

// actsForParam refuses a node key acting for another node than :id.
func (s *Server) actsForParam(c *fiber.Ctx) error {
	if err := actsFor(c, c.Params("id")); err != nil {
		return err
	}
	return c.Next()
}

// actsFor refuses a node key acting for a node other than its own; an
// admin acts for any node.
func actsFor(c *fiber.Ctx, nodeID string) error {
	p := principalOf(c)
	if p.IsAdmin() || p.Has(apikey.Node) && p.NodeID == nodeID {
		return nil
	}
	if p.Has(apikey.Node) {
		return apiError(fiber.StatusForbidden, CodeForbidden, "this key acts for node %s only: scope %s for node %s, or %s, is needed",
			p.NodeID, apikey.Node, nodeID, apikey.Admin)
	}
	return forbidden(apikey.Node)
}

func forbidden(scope apikey.Scope) *Error {
	return apiError(fiber.StatusForbidden, CodeForbidden, "this key lacks scope %s, which this route needs", scope)
}

// owns says whether the caller may see a task or session of owner: its
// own, or any as admin. A task recorded before owners were (owner "") is
// the bootstrap key's.
func owns(c *fiber.Ctx, owner string) bool {
	p := principalOf(c)
	if p.IsAdmin() {
		return true
	}
	if owner == "" {
		owner = apikey.BootstrapID
	}
	return owner == p.KeyID
}

// StreamKeys is a KeyLookup that also holds the cluster's stream key
// (keyring.Ring): token stream credentials signed with it survive every
// API key's rotation.
type StreamKeys interface {
	StreamKey() []byte
}

// streamKeyNow is the key new stream credentials are signed with: the
// cluster's once the registry has been read, else the legacy one derived
// from the bootstrap token.
func (s *Server) streamKeyNow() []byte {
	if sk, ok := s.deps.Keys.(StreamKeys); ok {
		if k := sk.StreamKey(); len(k) > 0 {
			return k
		}
	}
	return s.streamKey
}

// checkSinkToken accepts a credential signed with the cluster's stream
// key or the legacy one (tasks admitted before the registry was read, or
// by an apiserver of the older release).
func (s *Server) checkSinkToken(taskID, tok string) bool {
	if sk, ok := s.deps.Keys.(StreamKeys); ok {
		if k := sk.StreamKey(); len(k) > 0 && tokenstream.CheckSinkToken(k, taskID, tok) {
			return true
		}
	}
	return tokenstream.CheckSinkToken(s.streamKey, taskID, tok)
}
