package apiserver

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// Admission reads a task's catalog entry (is the model there, active, how
// long its context is). Read from the bucket each time, that is an S3
// round trip in every first token's path; entries keeps them instead:
// fresh for entryFresh, then served while a reload runs in the background,
// up to entryStale. A change through this replica (register, lifecycle,
// delete) drops its entry at once; another replica's reaches admission
// here within entryFresh and the next task or two. A model the catalog
// lacks is not kept (a client naming random models would grow the cache):
// each such task reads the bucket. The catalog routes read the bucket,
// never this.
const (
	entryFresh = time.Second
	entryStale = 30 * time.Second
	// entryReload bounds a background reload.
	entryReload = 10 * time.Second
)

type entries struct {
	mu sync.Mutex
	m  map[string]*cachedEntry
}

type cachedEntry struct {
	e       model.Entry
	at      time.Time
	loading bool
}

// admissionEntry is the catalog entry of model id for admitting a task.
func (s *Server) admissionEntry(ctx context.Context, id string) (model.Entry, error) {
	c := &s.entryCache
	now := time.Now()
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]*cachedEntry{}
	}
	ce := c.m[id]
	switch {
	case ce != nil && now.Sub(ce.at) < entryFresh:
		c.mu.Unlock()
		return ce.e, nil
	case ce != nil && now.Sub(ce.at) < entryStale:
		if !ce.loading {
			ce.loading = true
			go func() {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), entryReload)
				defer cancel()
				_, _ = s.loadEntry(rctx, id)
			}()
		}
		c.mu.Unlock()
		return ce.e, nil
	}
	c.mu.Unlock()
	e, err := s.loadEntry(ctx, id)
	if errors.Is(err, modelstore.ErrEntryNotFound) {
		return e, s.entryNotFound(id)
	}
	return e, err
}

// loadEntry reads the entry from the bucket and keeps it; a model the
// catalog no longer has is dropped, and any other error keeps what was
// there.
func (s *Server) loadEntry(ctx context.Context, id string) (model.Entry, error) {
	e, err := s.rawEntry(ctx, id)
	c := &s.entryCache
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err == nil:
		c.m[id] = &cachedEntry{e: e, at: time.Now()}
	case errors.Is(err, modelstore.ErrEntryNotFound):
		delete(c.m, id)
	default:
		if ce := c.m[id]; ce != nil {
			ce.loading = false
		}
	}
	return e, err
}

// forgetEntry drops a model's entry after this replica changed it.
func (s *Server) forgetEntry(id string) {
	c := &s.entryCache
	c.mu.Lock()
	delete(c.m, id)
	c.mu.Unlock()
}
