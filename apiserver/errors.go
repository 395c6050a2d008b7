package apiserver

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
)

// Stable error codes of the envelope.
const (
	CodeInvalidParams = "INVALID_PARAMS"
	CodeMissingToken  = bearer.CodeMissing
	CodeBadToken      = bearer.CodeBad
	CodeNotFound      = "NOT_FOUND"
	CodeNodeNotFound  = "NODE_NOT_FOUND"
	CodeNodeLeft      = "NODE_LEFT"
	CodeAgentManaged  = "NODE_AGENT_MANAGED"
	CodeMethod        = "METHOD_NOT_ALLOWED"
	CodeUnavailable   = "UNAVAILABLE"
	CodeInternal      = "INTERNAL"
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
	var apiErr *Error
	var fe *fiber.Error
	switch {
	case errors.As(err, &apiErr):
	case errors.As(err, &fe):
		code := CodeInternal
		switch fe.Code {
		case fiber.StatusNotFound:
			code = CodeNotFound
		case fiber.StatusMethodNotAllowed:
			code = CodeMethod
		case fiber.StatusBadRequest, fiber.StatusRequestEntityTooLarge, fiber.StatusUnsupportedMediaType:
			code = CodeInvalidParams
		}
		apiErr = apiError(fe.Code, code, "%s", fe.Message)
	default:
		apiErr = apiError(fiber.StatusServiceUnavailable, CodeUnavailable, "the control plane could not complete the request: %v", err)
		apiErr.Retriable, apiErr.RetryAfterMs = true, 1000
		s.log(c).Error("request failed", "err", err)
	}
	// A request fasthttp refused before the middleware ran (its framing)
	// has no correlation id yet: every answer carries one.
	if len(c.Response().Header.Peek(headerCorrID)) == 0 {
		c.Set(headerCorrID, uuid.NewString())
	}
	if apiErr.RetryAfterMs > 0 {
		c.Set(fiber.HeaderRetryAfter, strconv.FormatInt((apiErr.RetryAfterMs+999)/1000, 10))
		c.Set("X-Backoff-Ms", strconv.FormatInt(apiErr.RetryAfterMs, 10))
	}
	return c.Status(apiErr.Status).JSON(apiErr.Envelope)
}
