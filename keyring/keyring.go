// Package keyring is an apiserver replica's cache of the API key registry
// (apikey, workflows.Keys): it polls the registry's query every Interval
// and answers token lookups from memory, so a revocation made on any
// replica is effective on this one within an Interval and a round trip.
// Invariants: a lookup never reaches Temporal; a token is accepted only
// if its key is live in the last snapshot read, that snapshot is younger
// than MaxStale (a replica cut off from Temporal fails closed), and its
// SHA-256 equals the record's (constant-time compare).
package keyring

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/llorch/llorch/apikey"
)

// Source reads the registry (control.Keys).
type Source interface {
	Snapshot(ctx context.Context, since int64) (apikey.Snapshot, error)
}

// Defaults of a Ring.
const (
	DefaultInterval = 250 * time.Millisecond
	DefaultMaxStale = 30 * time.Second
)

// Refusal reasons (the metric's reason label).
const (
	ReasonMalformed = "malformed" // not a key's token
	ReasonUnknown   = "unknown"
	ReasonMismatch  = "hash_mismatch"
	ReasonRevoked   = "revoked"
	ReasonExpired   = "expired"
	ReasonStale     = "stale" // no fresh snapshot: the registry is out of reach
)

// Ring is the cache.
type Ring struct {
	Source   Source
	Interval time.Duration // 0: DefaultInterval
	MaxStale time.Duration // 0: DefaultMaxStale
	Log      *slog.Logger
	Metrics  *Metrics // nil: none

	mu        sync.RWMutex
	loaded    bool
	version   int64
	byID      map[string]apikey.Record
	streamKey []byte
	loadedAt  time.Time // of the last successful poll
}

// Metrics of a ring.
type Metrics struct {
	keys     *prometheus.GaugeVec
	refusals *prometheus.CounterVec
	polls    *prometheus.CounterVec
}

// NewMetrics registers the ring's metrics on reg; the cache age is read
// from r at scrape time.
func NewMetrics(reg prometheus.Registerer, r *Ring) *Metrics {
	f := promauto.With(reg)
	f.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "llorch_api_keys_cache_age_seconds", Help: "Age of this replica's copy of the API key registry (-1 before the first read).",
	}, func() float64 {
		r.mu.RLock()
		defer r.mu.RUnlock()
		if !r.loaded {
			return -1
		}
		return time.Since(r.loadedAt).Seconds()
	})
	return &Metrics{
		keys: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_api_keys", Help: "API keys in the registry, by state (live, revoked, expired).",
		}, []string{"state"}),
		refusals: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_api_key_lookup_refusals_total", Help: "Bearer tokens refused by the key cache, by reason.",
		}, []string{"reason"}),
		polls: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_api_keys_polls_total", Help: "Reads of the API key registry, by outcome (unchanged, changed, error).",
		}, []string{"outcome"}),
	}
}

func (r *Ring) interval() time.Duration {
	if r.Interval > 0 {
		return r.Interval
	}
	return DefaultInterval
}

func (r *Ring) maxStale() time.Duration {
	if r.MaxStale > 0 {
		return r.MaxStale
	}
	return DefaultMaxStale
}

// Load reads the registry once.
func (r *Ring) Load(ctx context.Context) error {
	r.mu.RLock()
	since := int64(-1)
	if r.loaded {
		since = r.version
	}
	r.mu.RUnlock()
	s, err := r.Source.Snapshot(ctx, since)
	if err != nil {
		r.poll("error")
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.loadedAt = time.Now()
	if s.Keys == nil && r.loaded && s.Version == r.version {
		r.poll("unchanged")
		return nil
	}
	byID := make(map[string]apikey.Record, len(s.Keys))
	for _, k := range s.Keys {
		byID[k.ID] = k
	}
	r.byID, r.version, r.streamKey, r.loaded = byID, s.Version, s.StreamKey, true
	r.poll("changed")
	r.count()
	return nil
}

func (r *Ring) poll(outcome string) {
	if r.Metrics != nil {
		r.Metrics.polls.WithLabelValues(outcome).Inc()
	}
}

// count sets the key gauges (r.mu held).
func (r *Ring) count() {
	if r.Metrics == nil {
		return
	}
	now := time.Now()
	n := map[string]int{"live": 0, "revoked": 0, "expired": 0}
	for _, k := range r.byID {
		switch {
		case !k.RevokedAt.IsZero():
			n["revoked"]++
		case !k.Live(now):
			n["expired"]++
		default:
			n["live"]++
		}
	}
	for st, c := range n {
		r.Metrics.keys.WithLabelValues(st).Set(float64(c))
	}
}

// Run reads the registry at once, then every Interval, until ctx ends
// (before the first read, only the bootstrap token authenticates). A
// failed read is logged once per outage; the last snapshot serves until
// it is MaxStale old.
func (r *Ring) Run(ctx context.Context) {
	t := time.NewTicker(r.interval())
	defer t.Stop()
	failing := false
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := r.Load(pctx)
		cancel()
		switch {
		case err != nil && !failing && ctx.Err() == nil:
			failing = true
			r.Log.Warn("cannot read the API key registry: keys keep the last copy until it is stale", "err", err, "max_stale", r.maxStale())
		case err == nil && failing:
			failing = false
			r.Log.Info("API key registry read again")
		}
	}
}

// Lookup finds the live key a token belongs to (apiserver.KeyLookup).
func (r *Ring) Lookup(token string) (apikey.Principal, bool) {
	p, reason := r.lookup(token)
	if reason != "" {
		if r.Metrics != nil {
			r.Metrics.refusals.WithLabelValues(reason).Inc()
		}
		return apikey.Principal{}, false
	}
	return p, true
}

func (r *Ring) lookup(token string) (apikey.Principal, string) {
	id, ok := apikey.ParseToken(token)
	if !ok {
		return apikey.Principal{}, ReasonMalformed
	}
	r.mu.RLock()
	rec, found := r.byID[id]
	fresh := r.loaded && time.Since(r.loadedAt) < r.maxStale()
	r.mu.RUnlock()
	switch {
	case !fresh:
		return apikey.Principal{}, ReasonStale
	case !found:
		return apikey.Principal{}, ReasonUnknown
	case subtle.ConstantTimeCompare([]byte(apikey.Hash(token)), []byte(rec.Hash)) != 1:
		return apikey.Principal{}, ReasonMismatch
	case !rec.RevokedAt.IsZero():
		return apikey.Principal{}, ReasonRevoked
	case !rec.Live(time.Now()):
		return apikey.Principal{}, ReasonExpired
	}
	return rec.Principal(), ""
}

// StreamKey is the cluster's key of token stream credentials (nil before
// the first read).
func (r *Ring) StreamKey() []byte {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.streamKey
}
