package apiserver

import (
	"errors"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
)

// CodeKeyNotFound answers a key id the registry does not hold.
const CodeKeyNotFound = "KEY_NOT_FOUND"

// keyRequest is the body of POST /v2/keys.
type keyRequest struct {
	Name      string         `json:"name"`
	Scopes    []apikey.Scope `json:"scopes"`
	ExpiresAt *string        `json:"expires_at"` // RFC 3339
	Limits    *apikey.Limits `json:"limits"`
	NodeID    string         `json:"node_id"`
}

// keyJSON is a key as the API shows it: never its secret or hash.
type keyJSON struct {
	KeyID     string         `json:"key_id"`
	Name      string         `json:"name"`
	Scopes    []apikey.Scope `json:"scopes"`
	NodeID    string         `json:"node_id,omitempty"`
	State     string         `json:"state"` // live, revoked or expired
	CreatedAt time.Time      `json:"created_at"`
	CreatedBy apikey.Actor   `json:"created_by"`
	ExpiresAt *time.Time     `json:"expires_at,omitempty"`
	Limits    apikey.Limits  `json:"limits"`
	RevokedAt *time.Time     `json:"revoked_at,omitempty"`
	RevokedBy *apikey.Actor  `json:"revoked_by,omitempty"`
	// Secret is the token, in the answer to the create only.
	Secret string `json:"secret,omitempty"`
}

func renderKey(r apikey.Record, now time.Time) keyJSON {
	k := keyJSON{KeyID: r.ID, Name: r.Name, Scopes: r.Scopes, NodeID: r.NodeID, State: "live",
		CreatedAt: r.CreatedAt, CreatedBy: r.CreatedBy, ExpiresAt: timePtr(r.ExpiresAt), Limits: r.Limits,
		RevokedAt: timePtr(r.RevokedAt)}
	switch {
	case !r.RevokedAt.IsZero():
		k.State, k.RevokedBy = "revoked", &r.RevokedBy
	case !r.Live(now):
		k.State = "expired"
	}
	return k
}

func (s *Server) createKey(c *fiber.Ctx) error {
	var r keyRequest
	if err := decode(c, &r, false); err != nil {
		return err
	}
	req := apikey.CreateRequest{Name: r.Name, Scopes: r.Scopes, NodeID: r.NodeID, CreatedBy: actorOf(c)}
	if r.ExpiresAt != nil {
		t, err := time.Parse(time.RFC3339, *r.ExpiresAt)
		if err != nil {
			return invalidParam("expires_at", "want an RFC 3339 time, got %q", *r.ExpiresAt)
		}
		req.ExpiresAt = t.UTC()
	}
	if r.Limits != nil {
		req.Limits = *r.Limits
	}
	if r.NodeID != "" {
		if err := node.ValidateID(r.NodeID); err != nil {
			return invalidParam("node_id", "%v", err)
		}
	}
	id, token, err := apikey.NewToken()
	if err != nil {
		return err
	}
	req.ID, req.Hash = id, apikey.Hash(token)
	// Checked here first for a clear answer without a round trip; the
	// registry checks again against its own clock.
	if err := req.Validate(time.Now()); err != nil {
		return keyAPIError(err, id)
	}
	rec, err := s.deps.KeyRegistry.Create(c.UserContext(), req)
	if err != nil {
		return keyAPIError(err, id)
	}
	s.log(c).Info("API key created", "key_id", rec.ID, "name", rec.Name, "scopes", rec.Scopes, "node_id", rec.NodeID)
	out := renderKey(rec, time.Now())
	out.Secret = token
	return c.Status(fiber.StatusCreated).JSON(out)
}

func (s *Server) listKeys(c *fiber.Ctx) error {
	snap, err := s.deps.KeyRegistry.Snapshot(c.UserContext(), -1)
	if err != nil {
		return err
	}
	now := time.Now()
	out := make([]keyJSON, 0, len(snap.Keys))
	for _, r := range snap.Keys {
		out = append(out, renderKey(r, now))
	}
	return c.JSON(fiber.Map{"keys": out, "count": len(out)})
}

func keyID(c *fiber.Ctx) (string, error) { return idParam(c, apikey.ValidateID) }

func (s *Server) getKey(c *fiber.Ctx) error {
	id, err := keyID(c)
	if err != nil {
		return err
	}
	rec, err := s.deps.KeyRegistry.Get(c.UserContext(), id)
	if err != nil {
		return keyAPIError(err, id)
	}
	return c.JSON(renderKey(rec, time.Now()))
}

// revokeKey revokes a key; again is the same answer. Every replica
// refuses it within a poll of its key cache.
func (s *Server) revokeKey(c *fiber.Ctx) error {
	id, err := keyID(c)
	if err != nil {
		return err
	}
	rec, err := s.deps.KeyRegistry.Revoke(c.UserContext(), id, actorOf(c))
	if err != nil {
		return keyAPIError(err, id)
	}
	s.log(c).Info("API key revoked", "key_id", rec.ID, "name", rec.Name)
	return c.JSON(renderKey(rec, time.Now()))
}

func keyAPIError(err error, id string) error {
	var fe *apikey.FieldError
	var inv *control.InvalidKeyError
	switch {
	case errors.As(err, &fe):
		return invalidParam(fe.Field, "%s", fe.Message)
	case errors.As(err, &inv):
		field := inv.Field
		if field == "" {
			field = "body"
		}
		return invalidParam(field, "%s", inv.Message)
	case errors.Is(err, control.ErrKeyNotFound):
		return apiError(fiber.StatusNotFound, CodeKeyNotFound, "key %s does not exist", id)
	case errors.Is(err, control.ErrKeyExists):
		return apiError(fiber.StatusConflict, "KEY_EXISTS", "key %s exists", id)
	}
	return err
}
