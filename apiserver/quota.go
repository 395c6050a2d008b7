package apiserver

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/task"
)

// admitQuota takes a unit of the caller's key's quota for req, before the
// scheduler sees it: req carries the key so the task's workflow releases
// it when it ends. release gives back a new admission at once (the task
// did not start). A key without limits makes no round trip.
func (s *Server) admitQuota(c *fiber.Ctx, req task.Request) (task.Request, func(), error) {
	p := principalOf(c)
	if s.deps.Quotas == nil || p.Limits.None() || p.KeyID == "" {
		return req, func() {}, nil
	}
	isNew, err := s.deps.Quotas.Admit(c.UserContext(), p.KeyID, req.TaskID, p.Limits)
	var ex *control.ExceededError
	if errors.As(err, &ex) {
		s.log(c).Info("task refused by its key's quota", "task_id", req.TaskID, "key_id", p.KeyID, "limit", ex.Limit,
			"allowed", ex.Allowed, "used", ex.Used, "retry_after_ms", ex.RetryAfterMs)
		return req, nil, quotaError(c, p.Name, ex)
	}
	if err != nil {
		return req, nil, err
	}
	req.QuotaKey = p.KeyID
	release := func() {}
	if isNew {
		log := s.log(c) // release may run after the request (a start that failed later)
		release = func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := s.deps.Quotas.Release(ctx, p.KeyID, req.TaskID); err != nil {
				log.Warn("quota not released after a failed start", "task_id", req.TaskID, "key_id", p.KeyID, "err", err)
			}
		}
	}
	return req, release, nil
}

// quotaError is a refusal as the API answers it: 429 with Retry-After, in
// whole seconds rounded up (the envelope's retry_after_ms is exact).
func quotaError(c *fiber.Ctx, keyName string, ex *control.ExceededError) error {
	ms := max(ex.RetryAfterMs, 1)
	e := apiError(fiber.StatusTooManyRequests, CodeQuotaExceeded, "quota exceeded for key %s (%s): %s is %d and %d are used; retry in %d ms",
		keyName, ex.KeyID, ex.Limit, ex.Allowed, ex.Used, ms)
	e.Retriable, e.RetryAfterMs, e.PolicyLabel = true, ms, ex.Limit
	c.Set(fiber.HeaderRetryAfter, strconv.FormatInt((ms+999)/1000, 10))
	c.Set("X-Backoff-Ms", strconv.FormatInt(ms, 10))
	return e
}

// keyUsage is GET /v2/keys/:id/usage: the key's requests, tokens in and
// out (in all and over the last minute), tasks in flight, and its limits.
// An admin reads any key's; a key reads its own.
func (s *Server) keyUsage(c *fiber.Ctx) error {
	id, err := idParam(c, quota.ValidateKeyID)
	if err != nil {
		return err
	}
	p := principalOf(c)
	if !p.IsAdmin() && p.KeyID != id {
		return apiError(fiber.StatusForbidden, CodeForbidden, "key %s may read its own usage only (GET /v2/keys/%s/usage); key %s's needs scope admin", p.KeyID, p.KeyID, id)
	}
	if s.deps.Quotas == nil {
		return apiError(fiber.StatusServiceUnavailable, CodeUnavailable, "this apiserver meters no quotas")
	}
	u, err := s.deps.Quotas.Usage(c.UserContext(), id)
	if err != nil {
		return err
	}
	if p.KeyID == id {
		u.Limits = p.Limits // the key's own, current limits (the workflow's are its last admission's)
	}
	return c.JSON(u)
}
