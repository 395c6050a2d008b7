package apiserver

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// TokenIdentity is how a token appears in logs: never the token itself.
func TokenIdentity(token string) string {
	sum := sha256.Sum256([]byte(token))
	return "token:" + hex.EncodeToString(sum[:])[:6]
}

// auth checks the bearer token in constant time. Comparing digests keeps the
// comparison independent of the presented token's length too.
func (s *Server) auth(c *fiber.Ctx) error {
	if s.tokenDigest == nil {
		c.Locals(localIdentity, "anonymous")
		return c.Next()
	}
	h := c.Get(fiber.HeaderAuthorization)
	if h == "" {
		s.metrics.authFailures.WithLabelValues(CodeMissingToken).Inc()
		return apiError(fiber.StatusUnauthorized, CodeMissingToken, "missing bearer token: send Authorization: Bearer <LLORCH_API_TOKEN>")
	}
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		s.metrics.authFailures.WithLabelValues(CodeBadToken).Inc()
		return apiError(fiber.StatusUnauthorized, CodeBadToken, "malformed Authorization header: want Bearer <token>")
	}
	sum := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(sum[:], s.tokenDigest) != 1 {
		s.metrics.authFailures.WithLabelValues(CodeBadToken).Inc()
		s.log(c).Warn("rejected token", "presented", TokenIdentity(token))
		return apiError(fiber.StatusUnauthorized, CodeBadToken, "bearer token not accepted")
	}
	c.Locals(localIdentity, s.identity)
	return c.Next()
}
