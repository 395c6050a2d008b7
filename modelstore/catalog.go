package modelstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/minio/minio-go/v7"

	"github.com/llorch/llorch/model"
)

// ErrEntryNotFound is wrapped when the catalog has no entry for an id.
var ErrEntryNotFound = errors.New("model not in the catalog")

// maxEntryBytes bounds what GetEntry reads: an entry is a few hundred bytes.
const maxEntryBytes = 1 << 20

// PutEntry writes e as JSON at model.EntryKey(e.ID), replacing any entry
// with that id. The catalog lives in the models' bucket: it is as durable as
// the models and needs no database.
func (s *Store) PutEntry(ctx context.Context, e model.Entry) error {
	if err := validateEntry(e); err != nil {
		return err
	}
	body, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return fmt.Errorf("modelstore: encode entry %s: %w", e.ID, err)
	}
	key := model.EntryKey(e.ID)
	_, err = s.Client.PutObject(ctx, s.Bucket, key, bytes.NewReader(body), int64(len(body)),
		minio.PutObjectOptions{ContentType: "application/json", DisableMultipart: true})
	if err != nil {
		return fmt.Errorf("modelstore: write entry s3://%s/%s: %w", s.Bucket, key, err)
	}
	return nil
}

func validateEntry(e model.Entry) error {
	if err := model.ValidateID(e.ID); err != nil {
		return err
	}
	if err := model.ValidateKey(e.Key); err != nil {
		return fmt.Errorf("entry %s: %w", e.ID, err)
	}
	if err := model.ValidateSHA256(e.SHA256); err != nil {
		return fmt.Errorf("entry %s: %w", e.ID, err)
	}
	if e.Size < 0 {
		return fmt.Errorf("entry %s: size %d is negative", e.ID, e.Size)
	}
	return nil
}

// GetEntry reads the entry of id; a missing one wraps ErrEntryNotFound.
func (s *Store) GetEntry(ctx context.Context, id string) (model.Entry, error) {
	if err := model.ValidateID(id); err != nil {
		return model.Entry{}, err
	}
	key := model.EntryKey(id)
	obj, err := s.Client.GetObject(ctx, s.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return model.Entry{}, s.entryErr(id, err)
	}
	defer obj.Close()
	body, err := io.ReadAll(io.LimitReader(obj, maxEntryBytes+1))
	if err != nil {
		return model.Entry{}, s.entryErr(id, err)
	}
	if len(body) > maxEntryBytes {
		return model.Entry{}, fmt.Errorf("modelstore: entry s3://%s/%s is over %d bytes", s.Bucket, key, maxEntryBytes)
	}
	var e model.Entry
	if err := json.Unmarshal(body, &e); err != nil {
		return model.Entry{}, fmt.Errorf("modelstore: entry s3://%s/%s is not valid JSON: %w", s.Bucket, key, err)
	}
	if e.ID != id {
		return model.Entry{}, fmt.Errorf("modelstore: entry s3://%s/%s holds id %q", s.Bucket, key, e.ID)
	}
	return e, nil
}

func (s *Store) entryErr(id string, err error) error {
	if isNotFound(err) {
		return fmt.Errorf("%w: %s", ErrEntryNotFound, id)
	}
	return fmt.Errorf("modelstore: read entry s3://%s/%s: %w", s.Bucket, model.EntryKey(id), err)
}

// ListEntries reads every entry of the catalog, sorted by id. An entry
// deleted while the list runs is left out.
func (s *Store) ListEntries(ctx context.Context) ([]model.Entry, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the listing goroutine if we return early
	var ids []string
	for obj := range s.Client.ListObjects(ctx, s.Bucket, minio.ListObjectsOptions{Prefix: model.CatalogPrefix, Recursive: true}) {
		if obj.Err != nil {
			return nil, fmt.Errorf("modelstore: list s3://%s/%s: %w", s.Bucket, model.CatalogPrefix, obj.Err)
		}
		name, ok := strings.CutSuffix(strings.TrimPrefix(obj.Key, model.CatalogPrefix), ".json")
		if !ok || model.ValidateID(name) != nil {
			continue // not an entry (a stray object under catalog/)
		}
		ids = append(ids, name)
	}
	sort.Strings(ids)
	out := make([]model.Entry, 0, len(ids))
	for _, id := range ids {
		e, err := s.GetEntry(ctx, id)
		if errors.Is(err, ErrEntryNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// DeleteEntry removes the entry of id (not the model object); a missing one
// wraps ErrEntryNotFound.
func (s *Store) DeleteEntry(ctx context.Context, id string) error {
	if err := model.ValidateID(id); err != nil {
		return err
	}
	key := model.EntryKey(id)
	// S3 deletes are idempotent: only a stat tells a missing entry.
	if _, err := s.Client.StatObject(ctx, s.Bucket, key, minio.StatObjectOptions{}); err != nil {
		return s.entryErr(id, err)
	}
	if err := s.Client.RemoveObject(ctx, s.Bucket, key, minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("modelstore: delete entry s3://%s/%s: %w", s.Bucket, key, err)
	}
	return nil
}
