package activities

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
)

// PlanGCInput is what the node needs to plan its GC.
type PlanGCInput struct {
	NodeID  string
	Policy  node.GCPolicy
	InUse   []string // digests referenced by pools that are starting, ready or draining
	Catalog CatalogDigests
}

// CatalogDigests is what the catalog says about digests. A copy whose
// model is Retired, or no longer in a catalog that was read, is retired.
type CatalogDigests struct {
	Known   bool // the catalog was read; without it nothing counts as retired
	Active  []string
	Retired []string
}

func (d CatalogDigests) retired(copies []node.ModelCopy) map[string]bool {
	out := map[string]bool{}
	for _, s := range d.Retired {
		out[s] = true
	}
	if !d.Known {
		return out
	}
	active := map[string]bool{}
	for _, s := range d.Active {
		active[s] = true
	}
	for _, c := range copies {
		if !active[c.SHA256] {
			out[c.SHA256] = true
		}
	}
	return out
}

// EvictInput is one deletion, with its reason, as GC recorded it.
type EvictInput struct {
	NodeID   string
	Eviction model.Eviction
}

// GCActivities run on a node's queue, next to its model catalog.
type GCActivities struct {
	Local *modelstore.LocalCatalog
	// InUse reports digests the node's engines have open; nil means none.
	InUse   func() map[string]bool
	Log     *slog.Logger
	Metrics *GCMetrics
	// Catalog, when set, refreshes the catalog-bytes gauge after a deletion.
	Catalog *StagingMetrics
}

// PlanGC reads the local catalog and decides what to evict.
func (a *GCActivities) PlanGC(ctx context.Context, in PlanGCInput) (model.GCPlan, error) {
	copies, err := a.Local.Copies()
	if err != nil {
		return model.GCPlan{}, err
	}
	parts, err := a.Local.Partials()
	if err != nil {
		return model.GCPlan{}, err
	}
	partials := make([]modelstore.PartialFile, len(parts))
	for i, p := range parts {
		partials[i] = modelstore.PartialFile{SHA256: p.SHA256, Size: p.Size, ModTime: p.ModTime}
	}
	free, err := a.Local.FreeBytes()
	if err != nil {
		return model.GCPlan{}, err
	}
	inUse := a.inUse()
	for _, s := range in.InUse {
		inUse[s] = true
	}
	return modelstore.PlanGC(copies, partials, in.Policy, free, inUse, in.Catalog.retired(copies), time.Now()), nil
}

func (a *GCActivities) inUse() map[string]bool {
	if a.InUse == nil {
		return map[string]bool{}
	}
	return a.InUse()
}

// Evict deletes one model or partial file. It checks again that no engine
// opened the model since the plan was made: a model in use is never deleted.
func (a *GCActivities) Evict(ctx context.Context, in EvictInput) error {
	e := in.Eviction
	if err := model.ValidateSHA256(e.SHA256); err != nil {
		return temporal.NewNonRetryableApplicationError(err.Error(), model.ErrInvalidEviction, nil)
	}
	if e.Kind == "partial" {
		if err := removeUnlockedPartial(a.Local.PartialPath(e.SHA256)); err != nil {
			if errors.Is(err, unix.EWOULDBLOCK) {
				return temporal.NewNonRetryableApplicationError(
					fmt.Sprintf("partial download %s on node %s is being written; not evicted", e.SHA256[:12], in.NodeID), model.ErrInUse, nil)
			}
			return err
		}
	} else {
		if a.inUse()[e.SHA256] {
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("model %s (%s) on node %s is in use; not evicted", e.ModelID, e.SHA256[:12], in.NodeID), model.ErrInUse, nil)
		}
		if err := a.Local.Remove(e.SHA256); err != nil {
			return err
		}
	}
	a.Log.Info("evicted", "node_id", in.NodeID, "kind", e.Kind, "model_id", e.ModelID, "sha256", e.SHA256[:12],
		"bytes", e.Bytes, "reason", e.Reason, "detail", e.Detail)
	a.Metrics.observe(in.NodeID, e)
	if a.Catalog != nil {
		_ = a.Catalog.ObserveCatalog(in.NodeID, a.Local)
	}
	return nil
}

// GCMetrics count evictions.
type GCMetrics struct {
	Evictions    *prometheus.CounterVec
	EvictedBytes *prometheus.CounterVec
}

// NewGCMetrics registers the GC metrics on reg.
func NewGCMetrics(reg prometheus.Registerer) *GCMetrics {
	f := promauto.With(reg)
	return &GCMetrics{
		Evictions: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_gc_evictions_total", Help: "Files GC deleted from a node's model catalog, by reason.",
		}, []string{"node_id", "reason"}),
		EvictedBytes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_gc_evicted_bytes_total", Help: "Bytes GC freed on a node, by reason.",
		}, []string{"node_id", "reason"}),
	}
}

func (m *GCMetrics) observe(nodeID string, e model.Eviction) {
	if m == nil {
		return
	}
	m.Evictions.WithLabelValues(nodeID, e.Reason).Inc()
	m.EvictedBytes.WithLabelValues(nodeID, e.Reason).Add(float64(e.Bytes))
}

// CatalogActivities read the catalog; they run on the control queue, where
// the S3 credentials of the control plane are.
type CatalogActivities struct {
	Store *modelstore.Store
}

// Digests reads which digests the catalog holds as Active or Retired. With
// no store configured it says so (Known false) rather than "nothing".
func (a *CatalogActivities) Digests(ctx context.Context) (CatalogDigests, error) {
	if a.Store == nil {
		return CatalogDigests{}, nil
	}
	entries, err := a.Store.ListEntries(ctx)
	if err != nil {
		return CatalogDigests{}, err
	}
	d := CatalogDigests{Known: true}
	for _, e := range entries {
		if e.Lifecycle == model.Retired {
			d.Retired = append(d.Retired, e.SHA256)
		} else {
			d.Active = append(d.Active, e.SHA256)
		}
	}
	return d, nil
}

// removeUnlockedPartial deletes a partial download unless a staging holds
// its lock (the download activity locks the file while it writes).
func removeUnlockedPartial(path string) error {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}
