package modelstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/google/uuid"
	"github.com/minio/minio-go/v7"

	"github.com/llorch/llorch/model"
)

// Codes of a refused catalog change (CatalogError.Code). The API answers
// with them as they are.
const (
	CodeInvalidParams    = "INVALID_PARAMS" // Field names the bad one
	CodeModelExists      = "MODEL_EXISTS"
	CodeKeyInUse         = "KEY_IN_USE"
	CodeObjectNotFound   = "OBJECT_NOT_FOUND"
	CodeNotGGUF          = model.ErrNotGGUF
	CodeChecksumMismatch = model.ErrChecksumMismatch
)

// CatalogError is a catalog change refused for a reason the caller can act
// on; its message says what was expected.
type CatalogError struct {
	Code  string
	Field string // with CodeInvalidParams
	Msg   string
}

func (e *CatalogError) Error() string { return e.Msg }

func refuse(code, format string, args ...any) error {
	return &CatalogError{Code: code, Msg: fmt.Sprintf(format, args...)}
}

func invalid(field, format string, args ...any) error {
	return &CatalogError{Code: CodeInvalidParams, Field: field, Msg: fmt.Sprintf(format, args...)}
}

// EstimateContext is the context size the catalog's VRAM estimates are for.
const EstimateContext = 4096

// Registration asks for a model in the catalog: an object already in the
// bucket (Key, or SourceKey holding the content until it is accepted), or
// the model itself (Body).
type Registration struct {
	ID      string
	Key     string // default model.DefaultKey(ID)
	SHA256  string // expected; "" to compute
	Size    int64  // expected; 0 to take the object's
	Replace bool
	// SourceKey, when set, holds the content: it is checked there and
	// copied to Key only once accepted (replacing a model in place).
	SourceKey string
	// Body is an upload of BodySize bytes (-1: unknown).
	Body     io.Reader
	BodySize int64
}

// Registered is what a registration did.
type Registered struct {
	Entry     model.Entry
	Unchanged bool // the id already held this content: nothing was written
	Replaced  bool
}

func (r *Registration) validate() error {
	if err := model.ValidateID(r.ID); err != nil {
		return invalid("id", "%v", err)
	}
	if r.Key == "" {
		r.Key = model.DefaultKey(r.ID)
	}
	if err := model.ValidateKey(r.Key); err != nil {
		return invalid("key", "%v", err)
	}
	if r.SHA256 != "" {
		if err := model.ValidateSHA256(r.SHA256); err != nil {
			return invalid("sha256", "%v", err)
		}
	}
	if r.Size < 0 {
		return invalid("size", "must be >= 0")
	}
	if r.SourceKey != "" {
		if err := model.ValidateKey(r.SourceKey); err != nil {
			return invalid("source_key", "%v", err)
		}
	}
	return nil
}

// Register adds a model to the catalog. The object is hashed and its GGUF
// header read before anything is recorded; an upload goes to a scratch key
// first, so a registered model's object is never overwritten before the
// upload is known to be allowed and to be a GGUF model, and a refused
// registration leaves nothing behind.
func (s *Store) Register(ctx context.Context, r Registration) (Registered, error) {
	if err := r.validate(); err != nil {
		return Registered{}, err
	}
	upload := r.Body != nil
	existing, err := s.GetEntry(ctx, r.ID)
	exists := err == nil
	if err != nil && !errors.Is(err, ErrEntryNotFound) {
		return Registered{}, err
	}
	if err := s.checkKeyFree(ctx, r.ID, r.Key); err != nil {
		return Registered{}, err
	}
	key := r.Key
	if r.SourceKey != "" && !upload {
		key = r.SourceKey
		defer s.removeScratch(ctx, key)
	}
	if upload {
		key = "uploads/" + uuid.NewString()
		defer s.removeScratch(ctx, key)
		if r.SHA256, err = s.Upload(ctx, r.Body, r.BodySize, key, nil); err != nil {
			return Registered{}, err
		}
	}
	if exists && !r.Replace && r.SHA256 != "" {
		return sameOrExists(existing, r.SHA256)
	}
	info, meta, sha, err := s.inspect(ctx, key, r.SHA256 != "" && upload)
	if err != nil {
		return Registered{}, err
	}
	if upload {
		sha = r.SHA256
	}
	if r.Size > 0 && r.Size != info.Size {
		return Registered{}, invalid("size", "object %s has %d bytes, not %d", r.Key, info.Size, r.Size)
	}
	if r.SHA256 != "" && r.SHA256 != sha {
		return Registered{}, refuse(CodeChecksumMismatch, "object %s has sha256 %s, not the %s given", r.Key, sha, r.SHA256)
	}
	if exists && !r.Replace {
		return sameOrExists(existing, sha)
	}
	if key != r.Key {
		if _, err := s.Client.ComposeObject(ctx, minio.CopyDestOptions{Bucket: s.Bucket, Object: r.Key},
			minio.CopySrcOptions{Bucket: s.Bucket, Object: key}); err != nil {
			return Registered{}, err
		}
	}
	now := time.Now().UTC()
	e := model.Entry{ID: r.ID, Key: r.Key, SHA256: sha, Size: info.Size, Metadata: meta,
		Lifecycle: model.Active, CreatedAt: now, VerifiedAt: now}
	if exists {
		e.CreatedAt = existing.CreatedAt
	}
	if err := s.PutEntry(ctx, e); err != nil {
		return Registered{}, err
	}
	return Registered{Entry: e, Replaced: exists}, nil
}

// removeScratch deletes a registration's scratch object, even when the
// request that made it was canceled.
func (s *Store) removeScratch(ctx context.Context, key string) {
	_ = s.Client.RemoveObject(context.WithoutCancel(ctx), s.Bucket, key, minio.RemoveObjectOptions{})
}

// inspect reads an object's size and GGUF header and, unless the digest is
// already known from the upload, hashes it.
func (s *Store) inspect(ctx context.Context, key string, hashed bool) (minio.ObjectInfo, model.Metadata, string, error) {
	info, err := s.Stat(ctx, key)
	if errors.Is(err, ErrObjectMissing) {
		return info, model.Metadata{}, "", refuse(CodeObjectNotFound, "no object %s in bucket %s", key, s.Bucket)
	}
	if err != nil {
		return info, model.Metadata{}, "", err
	}
	url, err := s.PresignGet(ctx, key, 10*time.Minute)
	if err != nil {
		return info, model.Metadata{}, "", err
	}
	meta, err := ReadMetadataRemote(ctx, url, EstimateContext)
	if errors.Is(err, ErrNotGGUF) {
		return info, meta, "", refuse(CodeNotGGUF, "the object is not a GGUF model: %v", err)
	}
	if err != nil || hashed {
		return info, meta, "", err
	}
	sha, _, err := s.HashObject(ctx, key)
	return info, meta, sha, err
}

// sameOrExists answers a registration of an id that exists: identical
// content is a no-op, different content needs replace.
func sameOrExists(existing model.Entry, sha string) (Registered, error) {
	if existing.SHA256 == sha {
		return Registered{Entry: existing, Unchanged: true}, nil
	}
	return Registered{}, refuse(CodeModelExists,
		"model %s exists with sha256 %s; this content has sha256 %s: pass replace to overwrite it", existing.ID, existing.SHA256, sha)
}

func (s *Store) checkKeyFree(ctx context.Context, id, key string) error {
	entries, err := s.ListEntries(ctx)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Key == key && e.ID != id {
			return refuse(CodeKeyInUse, "object %s already belongs to model %s", key, e.ID)
		}
	}
	return nil
}

// Verify hashes a model's object again: bit rot or an overwritten object is
// found here, before a node downloads it. A match records VerifiedAt.
func (s *Store) Verify(ctx context.Context, e model.Entry) (model.Entry, error) {
	sha, size, err := s.HashObject(ctx, e.Key)
	if errors.Is(err, ErrObjectMissing) {
		return e, refuse(CodeObjectNotFound, "model %s: no object %s in bucket %s", e.ID, e.Key, s.Bucket)
	}
	if err != nil {
		return e, err
	}
	if sha != e.SHA256 || size != e.Size {
		return e, refuse(CodeChecksumMismatch,
			"model %s: object %s has sha256 %s (%d bytes), the catalog expects %s (%d bytes)", e.ID, e.Key, sha, size, e.SHA256, e.Size)
	}
	e.VerifiedAt = time.Now().UTC()
	return e, s.PutEntry(ctx, e)
}

// Delete removes a model's catalog entry and, unless keepObject, its
// object. The entry goes first: a model is never listed without its file.
// objErr is an object that could not be removed after the entry was.
func (s *Store) Delete(ctx context.Context, e model.Entry, keepObject bool) (objErr, err error) {
	if err := s.DeleteEntry(ctx, e.ID); err != nil {
		return nil, err
	}
	if keepObject {
		return nil, nil
	}
	return s.Client.RemoveObject(ctx, s.Bucket, e.Key, minio.RemoveObjectOptions{}), nil
}
