package apiserver

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/minio/minio-go/v7"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// Catalog error codes.
const (
	CodeModelNotFound    = "MODEL_NOT_FOUND"
	CodeModelExists      = "MODEL_EXISTS"
	CodeModelRetired     = "MODEL_RETIRED"
	CodeKeyInUse         = "KEY_IN_USE"
	CodeObjectNotFound   = "OBJECT_NOT_FOUND"
	CodeNotGGUF          = model.ErrNotGGUF
	CodeChecksumMismatch = model.ErrChecksumMismatch
)

// estimateContext is the context size VRAM estimates are given for.
const estimateContext = 4096

func (s *Server) store() (*modelstore.Store, error) {
	if s.deps.Store == nil {
		return nil, apiError(fiber.StatusServiceUnavailable, CodeUnavailable,
			"no model store configured: start the apiserver with the S3 settings (--s3-endpoint, --s3-access-key, ...)")
	}
	return s.deps.Store, nil
}

func modelID(c *fiber.Ctx) (string, error) { return idParam(c, model.ValidateID) }

func (s *Server) entry(ctx context.Context, id string) (model.Entry, error) {
	st, err := s.store()
	if err != nil {
		return model.Entry{}, err
	}
	e, err := st.GetEntry(ctx, id)
	if errors.Is(err, modelstore.ErrEntryNotFound) {
		return e, apiError(fiber.StatusNotFound, CodeModelNotFound, "model %s is not in the catalog", id)
	}
	return e, err
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

// registerRequest registers an object already in the bucket.
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
// itself (?id=&key=&replace=). The object is hashed and its GGUF header
// read before anything is recorded.
func (s *Server) registerModel(c *fiber.Ctx) error {
	st, err := s.store()
	if err != nil {
		return err
	}
	var req registerModelRequest
	upload := strings.HasPrefix(c.Get(fiber.HeaderContentType), fiber.MIMEOctetStream)
	if upload {
		req = registerModelRequest{ID: c.Query("id"), Key: c.Query("key"), Replace: c.QueryBool("replace")}
	} else if err := decode(c, &req, false); err != nil {
		return err
	}
	if err := model.ValidateID(req.ID); err != nil {
		return invalidParam("id", "%v", err)
	}
	if req.Key == "" {
		req.Key = model.DefaultKey(req.ID)
	}
	if err := model.ValidateKey(req.Key); err != nil {
		return invalidParam("key", "%v", err)
	}
	if req.SHA256 != "" {
		if err := model.ValidateSHA256(req.SHA256); err != nil {
			return invalidParam("sha256", "%v", err)
		}
	}
	if req.Size < 0 {
		return invalidParam("size", "must be >= 0")
	}
	if req.SourceKey != "" {
		if err := model.ValidateKey(req.SourceKey); err != nil {
			return invalidParam("source_key", "%v", err)
		}
	}
	ctx := c.UserContext()
	existing, err := st.GetEntry(ctx, req.ID)
	exists := err == nil
	if err != nil && !errors.Is(err, modelstore.ErrEntryNotFound) {
		return err
	}
	if err := s.checkKeyFree(ctx, req.ID, req.Key); err != nil {
		return err
	}

	key := req.Key
	if req.SourceKey != "" && !upload {
		key = req.SourceKey
		defer func() { _ = st.Client.RemoveObject(context.WithoutCancel(ctx), st.Bucket, key, removeOpts) }()
	}
	if upload {
		// The body goes to a scratch key first: a registered model's object
		// is never overwritten before the upload is known to be allowed and
		// to be a GGUF model, and a refused upload leaves nothing behind.
		key = "uploads/" + uuid.NewString()
		defer func() { _ = st.Client.RemoveObject(context.WithoutCancel(ctx), st.Bucket, key, removeOpts) }()
		size := int64(c.Request().Header.ContentLength())
		if size < 0 {
			size = -1
		}
		if req.SHA256, err = st.Upload(ctx, c.Context().RequestBodyStream(), size, key, nil); err != nil {
			return err
		}
	}
	if exists && !req.Replace && req.SHA256 != "" {
		return s.sameOrExists(c, existing, req.SHA256)
	}
	info, meta, sha, err := s.inspect(ctx, key, req.SHA256 != "" && upload)
	if err != nil {
		return err
	}
	if upload {
		sha = req.SHA256
	}
	if req.Size > 0 && req.Size != info.Size {
		return invalidParam("size", "object %s has %d bytes, not %d", req.Key, info.Size, req.Size)
	}
	if req.SHA256 != "" && req.SHA256 != sha {
		return apiError(fiber.StatusConflict, CodeChecksumMismatch,
			"object %s has sha256 %s, not the %s given", req.Key, sha, req.SHA256)
	}
	if exists && !req.Replace {
		return s.sameOrExists(c, existing, sha)
	}
	if key != req.Key {
		if _, err := st.Client.ComposeObject(ctx, minio.CopyDestOptions{Bucket: st.Bucket, Object: req.Key},
			minio.CopySrcOptions{Bucket: st.Bucket, Object: key}); err != nil {
			return err
		}
	}
	now := time.Now().UTC()
	e := model.Entry{ID: req.ID, Key: req.Key, SHA256: sha, Size: info.Size, Metadata: meta,
		Lifecycle: model.Active, CreatedAt: now, VerifiedAt: now}
	if exists {
		e.CreatedAt = existing.CreatedAt
	}
	if err := st.PutEntry(ctx, e); err != nil {
		return err
	}
	s.metrics.catalogChanges.WithLabelValues("register").Inc()
	s.log(c).Info("model registered", "model_id", e.ID, "key", e.Key, "sha256", e.SHA256, "size", e.Size, "replaced", exists)
	return c.Status(fiber.StatusCreated).JSON(e)
}

// inspect reads an object's size and GGUF header and, unless the digest is
// already known from the upload, hashes it.
func (s *Server) inspect(ctx context.Context, key string, hashed bool) (minio.ObjectInfo, model.Metadata, string, error) {
	st := s.deps.Store
	info, err := st.Stat(ctx, key)
	if errors.Is(err, modelstore.ErrObjectMissing) {
		return info, model.Metadata{}, "", apiError(fiber.StatusNotFound, CodeObjectNotFound, "no object %s in bucket %s", key, st.Bucket)
	}
	if err != nil {
		return info, model.Metadata{}, "", err
	}
	url, err := st.PresignGet(ctx, key, 10*time.Minute)
	if err != nil {
		return info, model.Metadata{}, "", err
	}
	meta, err := modelstore.ReadMetadataRemote(ctx, url, estimateContext)
	if errors.Is(err, modelstore.ErrNotGGUF) {
		return info, meta, "", apiError(fiber.StatusBadRequest, CodeNotGGUF, "the object is not a GGUF model: %v", err)
	}
	if err != nil || hashed {
		return info, meta, "", err
	}
	sha, _, err := st.HashObject(ctx, key)
	return info, meta, sha, err
}

// sameOrExists answers a registration of an id that exists: identical
// content is a no-op, different content needs replace.
func (s *Server) sameOrExists(c *fiber.Ctx, existing model.Entry, sha string) error {
	if existing.SHA256 == sha {
		c.Set("X-Llorch-Unchanged", "true")
		return c.Status(fiber.StatusOK).JSON(existing)
	}
	return apiError(fiber.StatusConflict, CodeModelExists,
		"model %s exists with sha256 %s; this content has sha256 %s: pass replace to overwrite it", existing.ID, existing.SHA256, sha)
}

func (s *Server) checkKeyFree(ctx context.Context, id, key string) error {
	entries, err := s.entries(ctx)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Key == key && e.ID != id {
			return apiError(fiber.StatusConflict, CodeKeyInUse, "object %s already belongs to model %s", key, e.ID)
		}
	}
	return nil
}

func (s *Server) deleteModel(c *fiber.Ctx) error {
	e, err := s.entryParam(c)
	if err != nil {
		return err
	}
	id := e.ID
	st := s.deps.Store
	if err := st.DeleteEntry(c.UserContext(), id); err != nil {
		return err
	}
	if !c.QueryBool("keep_object") {
		if err := st.Client.RemoveObject(c.UserContext(), st.Bucket, e.Key, removeOpts); err != nil {
			s.log(c).Warn("catalog entry deleted but its object was not", "model_id", id, "key", e.Key, "err", err)
		}
	}
	s.metrics.catalogChanges.WithLabelValues("delete").Inc()
	s.log(c).Info("model deleted", "model_id", id, "key", e.Key)
	return c.SendStatus(fiber.StatusNoContent)
}

type stateRequest struct {
	State string `json:"state"`
}

func (s *Server) setModelState(c *fiber.Ctx) error {
	id, err := modelID(c)
	if err != nil {
		return err
	}
	var req stateRequest
	if err := decode(c, &req, false); err != nil {
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
		if err := s.deps.Store.PutEntry(c.UserContext(), e); err != nil {
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
	id := e.ID
	sha, size, err := s.deps.Store.HashObject(c.UserContext(), e.Key)
	if errors.Is(err, modelstore.ErrObjectMissing) {
		return apiError(fiber.StatusNotFound, CodeObjectNotFound, "model %s: no object %s in bucket %s", id, e.Key, s.deps.Store.Bucket)
	}
	if err != nil {
		return err
	}
	if sha != e.SHA256 || size != e.Size {
		return apiError(fiber.StatusConflict, CodeChecksumMismatch,
			"model %s: object %s has sha256 %s (%d bytes), the catalog expects %s (%d bytes)", id, e.Key, sha, size, e.SHA256, e.Size)
	}
	e.VerifiedAt = time.Now().UTC()
	if err := s.deps.Store.PutEntry(c.UserContext(), e); err != nil {
		return err
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

var removeOpts = minio.RemoveObjectOptions{}
