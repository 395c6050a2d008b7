package apiserver

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/quota"
)

// Stable error codes of the envelope.
const (
	CodeInvalidParams = "INVALID_PARAMS"
	CodeMissingToken  = bearer.CodeMissing
	CodeBadToken      = bearer.CodeBad
	CodeForbidden     = "FORBIDDEN" // a key without the route's scope
	CodeNotFound      = "NOT_FOUND"
	CodeNodeNotFound  = "NODE_NOT_FOUND"
	CodeNodeLeft      = "NODE_LEFT"
	CodeAgentManaged  = "NODE_AGENT_MANAGED"
	CodeMethod        = "METHOD_NOT_ALLOWED"
	CodeUnavailable   = "UNAVAILABLE"
	CodeInternal      = "INTERNAL"
	// CodeQuotaExceeded: a key's quota refused the task (429, Retry-After).
	CodeQuotaExceeded = quota.ErrExceeded
)

// Error is an API error: an HTTP status and its envelope (the one type
// apiclient reads, so the two cannot drift).
type Error struct {
	Status int
	apiclient.Envelope
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func apiError(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Envelope: apiclient.Envelope{Code: code, Message: fmt.Sprintf(format, args...)}}
}

func invalidParam(field, format string, args ...any) *Error {
	e := apiError(fiber.StatusBadRequest, CodeInvalidParams, "%s: %s", field, fmt.Sprintf(format, args...))
	e.Field = field
	return e
}

// errorHandler renders every error, ours or fiber's, as the envelope.
func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	// A request fasthttp refused before the middleware ran (its framing)
	// has no correlation id yet: every answer carries one.
	framing := len(c.Response().Header.Peek(headerCorrID)) == 0
	if framing {
		c.Set(headerCorrID, uuid.NewString())
	}
	var apiErr *Error
	var fe *fiber.Error
	switch {
	case errors.As(err, &apiErr):
	case errors.As(err, &fe):
		code, msg := CodeInternal, fe.Message
		switch {
		case fe.Code == fiber.StatusNotFound:
			code = CodeNotFound
		case fe.Code == fiber.StatusMethodNotAllowed:
			code = CodeMethod
		case fe.Code >= 400 && fe.Code < 500: // 400, 408, 413, 415, 431
			code = CodeInvalidParams
		case fe.Code > 500:
			code = CodeUnavailable
		}
		// fasthttp's own messages quote the request's bytes, headers
		// (Authorization included) and all: never echo them (FuzzAPI).
		if framing && fe.Code == fiber.StatusBadRequest {
			msg = "the request could not be read: malformed request line, headers or body framing"
		}
		apiErr = apiError(fe.Code, code, "%s", msg)
	default:
		apiErr = apiError(fiber.StatusServiceUnavailable, CodeUnavailable, "the control plane could not complete the request: %v", err)
		apiErr.Retriable, apiErr.RetryAfterMs = true, 1000
		s.log(c).Error("request failed", "err", err)
	}
	if apiErr.RetryAfterMs > 0 {
		c.Set(fiber.HeaderRetryAfter, strconv.FormatInt((apiErr.RetryAfterMs+999)/1000, 10))
		c.Set("X-Backoff-Ms", strconv.FormatInt(apiErr.RetryAfterMs, 10))
	}
	// The /v1 routes answer in OpenAI's shape, a request refused for its
	// framing too.
	if framing && strings.HasPrefix(c.Path(), "/v1/") {
		return s.openAIError(c, apiErr)
	}
	return c.Status(apiErr.Status).JSON(apiErr.Envelope)
}
