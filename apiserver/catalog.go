package apiserver

import (
	"context"
	"errors"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// Catalog error codes.
const (
	CodeModelNotFound    = model.ErrNotFound
	CodeModelExists      = modelstore.CodeModelExists
	CodeModelRetired     = model.ErrRetired
	CodeKeyInUse         = modelstore.CodeKeyInUse
	CodeObjectNotFound   = modelstore.CodeObjectNotFound
	CodeNotGGUF          = modelstore.CodeNotGGUF
	CodeChecksumMismatch = modelstore.CodeChecksumMismatch
)

// catalogError renders a refused catalog change as the envelope.
func catalogError(err error) error {
	var ce *modelstore.CatalogError
	if !errors.As(err, &ce) {
		return err
	}
	switch ce.Code {
	case modelstore.CodeInvalidParams:
		return invalidParam(ce.Field, "%s", ce.Msg)
	case modelstore.CodeNotGGUF:
		return apiError(fiber.StatusBadRequest, ce.Code, "%s", ce.Msg)
	case modelstore.CodeObjectNotFound:
		return apiError(fiber.StatusNotFound, ce.Code, "%s", ce.Msg)
	default:
		return apiError(fiber.StatusConflict, ce.Code, "%s", ce.Msg)
	}
}

func (s *Server) store() (*modelstore.Store, error) {
	if s.deps.Store == nil {
		return nil, apiError(fiber.StatusServiceUnavailable, CodeUnavailable,
			"no model store configured: start the apiserver with the S3 settings (--s3-endpoint, --s3-access-key, ...)")
	}
	return s.deps.Store, nil
}

func modelID(c *fiber.Ctx) (string, error) { return idParam(c, model.ValidateID) }

func (s *Server) entry(ctx context.Context, id string) (model.Entry, error) {
	e, err := s.rawEntry(ctx, id)
	if errors.Is(err, modelstore.ErrEntryNotFound) {
		return e, s.entryNotFound(id)
	}
	return e, err
}

// rawEntry reads the entry from the bucket (modelstore.ErrEntryNotFound
// when there is none).
func (s *Server) rawEntry(ctx context.Context, id string) (model.Entry, error) {
	st, err := s.store()
	if err != nil {
		return model.Entry{}, err
	}
	return st.GetEntry(ctx, id)
}

func (s *Server) entryNotFound(id string) error {
	return apiError(fiber.StatusNotFound, CodeModelNotFound, "model %s is not in the catalog", id)
}

// activeEntry checks that a model is in the catalog and takes new work.
func (s *Server) activeEntry(ctx context.Context, id string) error {
	e, err := s.entry(ctx, id)
	if err != nil {
		return err
	}
	if e.Lifecycle != model.Active {
		return apiError(fiber.StatusConflict, CodeModelRetired, "model %s is %s", e.ID, e.Lifecycle)
	}
	return nil
}

// entries lists the catalog (never nil).
func (s *Server) entries(ctx context.Context) ([]model.Entry, error) {
	st, err := s.store()
	if err != nil {
		return nil, err
	}
	entries, err := st.ListEntries(ctx)
	if entries == nil {
		entries = []model.Entry{}
	}
	return entries, err
}

func (s *Server) listModels(c *fiber.Ctx) error {
	entries, err := s.entries(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(fiber.Map{"models": entries, "count": len(entries)})
}

// entryParam reads the :id route parameter and its catalog entry.
func (s *Server) entryParam(c *fiber.Ctx) (model.Entry, error) {
	id, err := modelID(c)
	if err != nil {
		return model.Entry{}, err
	}
	return s.entry(c.UserContext(), id)
}

func (s *Server) getModel(c *fiber.Ctx) error {
	e, err := s.entryParam(c)
	if err != nil {
		return err
	}
	return c.JSON(e)
}

// registerModelRequest registers an object already in the bucket.
type registerModelRequest struct {
	ID      string `json:"id"`
	Key     string `json:"key"`
	SHA256  string `json:"sha256"`
	Size    int64  `json:"size"`
	Replace bool   `json:"replace"`
	// SourceKey, when set, holds the content: it is checked there and
	// copied to Key only once accepted (replacing a model in place).
	SourceKey string `json:"source_key"`
}

// registerModel adds a model to the catalog: a JSON body names an object
// already in the bucket; an application/octet-stream body is the model
// itself (?id=&key=&replace=).
func (s *Server) registerModel(c *fiber.Ctx) error {
	st, err := s.store()
	if err != nil {
		return err
	}
	var r modelstore.Registration
	if strings.HasPrefix(c.Get(fiber.HeaderContentType), fiber.MIMEOctetStream) {
		r = modelstore.Registration{ID: c.Query("id"), Key: c.Query("key"), Replace: c.QueryBool("replace"),
			Body: c.Context().RequestBodyStream(), BodySize: max(int64(c.Request().Header.ContentLength()), -1)}
	} else {
		var req registerModelRequest
		if err := decode(c, &req, false); err != nil {
			return err
		}
		r = modelstore.Registration{ID: req.ID, Key: req.Key, SHA256: req.SHA256, Size: req.Size,
			Replace: req.Replace, SourceKey: req.SourceKey}
	}
	reg, err := st.Register(c.UserContext(), r)
	s.forgetEntry(r.ID)
	if err != nil {
		return catalogError(err)
	}
	e := reg.Entry
	if reg.Unchanged {
		c.Set("X-Llorch-Unchanged", "true")
		return c.Status(fiber.StatusOK).JSON(e)
	}
	s.metrics.catalogChanges.WithLabelValues("register").Inc()
	s.log(c).Info("model registered", "model_id", e.ID, "key", e.Key, "sha256", e.SHA256, "size", e.Size, "replaced", reg.Replaced)
	return c.Status(fiber.StatusCreated).JSON(e)
}

func (s *Server) deleteModel(c *fiber.Ctx) error {
	e, err := s.entryParam(c)
	if err != nil {
		return err
	}
	objErr, err := s.deps.Store.Delete(c.UserContext(), e, c.QueryBool("keep_object"))
	s.forgetEntry(e.ID)
	if err != nil {
		return err
	}
	if objErr != nil {
		s.log(c).Warn("catalog entry deleted but its object was not", "model_id", e.ID, "key", e.Key, "err", objErr)
	}
	s.metrics.catalogChanges.WithLabelValues("delete").Inc()
	s.log(c).Info("model deleted", "model_id", e.ID, "key", e.Key)
	return c.SendStatus(fiber.StatusNoContent)
}

type stateRequest struct {
	State string `json:"state"`
}

func (s *Server) setModelState(c *fiber.Ctx) error {
	var req stateRequest
	id, err := idAndBody(c, modelID, &req, false)
	if err != nil {
		return err
	}
	lc, err := model.ParseLifecycle(req.State)
	if err != nil {
		return invalidParam("state", "%v", err)
	}
	e, err := s.entry(c.UserContext(), id)
	if err != nil {
		return err
	}
	if e.Lifecycle != lc {
		e.Lifecycle = lc
		err := s.deps.Store.PutEntry(c.UserContext(), e)
		s.forgetEntry(id)
		if err != nil {
			return err
		}
		s.metrics.catalogChanges.WithLabelValues("state").Inc()
		s.log(c).Info("model state changed", "model_id", id, "state", lc)
	}
	return c.JSON(e)
}

// verifyModel hashes the object again: bit rot or an overwritten object is
// found here, before a node downloads it.
func (s *Server) verifyModel(c *fiber.Ctx) error {
	e, err := s.entryParam(c)
	if err != nil {
		return err
	}
	e, err = s.deps.Store.Verify(c.UserContext(), e)
	if err != nil {
		return catalogError(err)
	}
	return c.JSON(e)
}

// availability answers where each model is: per model, the nodes holding a
// verified copy; per node, what it holds and its disk. Read from the nodes'
// latest heartbeats.
func (s *Server) availability(c *fiber.Ctx) error {
	entries, err := s.entries(c.UserContext())
	if err != nil {
		return err
	}
	views, err := s.deps.Nodes.List(c.UserContext())
	if err != nil {
		return err
	}
	type nodeAvail struct {
		NodeID        string   `json:"node_id"`
		State         string   `json:"state"`
		Models        []string `json:"models"`
		BytesUsed     uint64   `json:"bytes_used"`
		DiskFreeBytes uint64   `json:"disk_free_bytes"`
	}
	holders := map[string][]string{} // sha -> node ids
	nodes := []nodeAvail{}
	for _, v := range views {
		if v.State == "Left" {
			continue
		}
		snap := v.LastSnapshot
		if v.Live != nil {
			snap = *v.Live
		}
		na := nodeAvail{NodeID: v.NodeID, State: string(v.State), Models: []string{}, BytesUsed: snap.ModelBytes, DiskFreeBytes: snap.DiskFreeBytes}
		for _, m := range snap.Models {
			holders[m.SHA256] = append(holders[m.SHA256], v.NodeID)
			na.Models = append(na.Models, m.ModelID)
		}
		nodes = append(nodes, na)
	}
	type modelAvail struct {
		ModelID   string   `json:"model_id"`
		SHA256    string   `json:"sha256"`
		Lifecycle string   `json:"lifecycle"`
		Nodes     []string `json:"nodes"`
	}
	models := []modelAvail{}
	for _, e := range entries {
		ns := holders[e.SHA256]
		if ns == nil {
			ns = []string{}
		}
		models = append(models, modelAvail{ModelID: e.ID, SHA256: e.SHA256, Lifecycle: string(e.Lifecycle), Nodes: ns})
	}
	return c.JSON(fiber.Map{"models": models, "nodes": nodes})
}
