package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/workers/engines"
)

// HandoffWatcher is the node side of engine handoff (DESIGN.md decision 8).
// It watches <runtime>/engines/ and turns each handoff file an engine's
// start writes into its pool's readiness event. When the worker starts, it
// first reports the engines an earlier worker left running: the pool adopts
// the one of its serving epoch; any other is fenced (stopped) here.
type HandoffWatcher struct {
	NodeID  string
	Engines *engines.Table
	Pools   *control.Pools
	Log     *slog.Logger
	// BeforeReport, when set, runs before each handoff is reported: the
	// agent brings its node link up to date with it.
	BeforeReport func(context.Context)

	claimed []pool.Handoff
	live    map[string]bool
}

const handoffUpdateTimeout = 15 * time.Second

// Run watches until ctx ends.
func (w *HandoffWatcher) Run(ctx context.Context) error {
	dir := w.Engines.Dir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer fw.Close()
	if err := fw.Add(dir); err != nil {
		return err
	}
	w.recover(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-fw.Errors:
			w.Log.Warn("handoff watcher", "err", err)
		case ev := <-fw.Events:
			// The start writes <pool>.json.tmp and renames it: a Create.
			if ev.Op&(fsnotify.Create|fsnotify.Write) == 0 || !strings.HasSuffix(ev.Name, ".json") {
				continue
			}
			h, err := engines.ReadHandoff(ev.Name)
			if err != nil || h.PoolID == "" {
				continue
			}
			go w.report(ctx, h, false)
		}
	}
}

// Claim takes over the engines an earlier worker of this node left
// running, before the worker polls its queue: a supervisor the dead worker
// never picked up then runs here on the engine, instead of failing for want
// of it (a restart the pool would count). One no handoff names (it never
// became ready) is fenced at once. Run reports the claimed ones.
func (w *HandoffWatcher) Claim() {
	w.live = map[string]bool{}
	for _, e := range w.Engines.Live() {
		w.live[engineKey(e.PoolID, e.Epoch, e.PID)] = true
		h, err := engines.ReadHandoff(pool.HandoffPath(w.Engines.RuntimeDir, e.PoolID))
		if err != nil || h.Epoch != e.Epoch || h.PID != e.PID {
			w.Log.Info("fencing an engine no handoff names", "pool", e.PoolID, "epoch", e.Epoch, "pid", e.PID)
			w.Engines.StopEpoch(e.PoolID, e.Epoch)
			continue
		}
		if err := w.Engines.Adopt(h); err != nil {
			w.Log.Warn("cannot adopt engine", "pool", e.PoolID, "err", err)
			w.Engines.StopEpoch(e.PoolID, e.Epoch)
			continue
		}
		w.claimed = append(w.claimed, h)
	}
}

func engineKey(poolID string, epoch int64, pid int) string {
	return fmt.Sprintf("%s@%d/%d", poolID, epoch, pid)
}

// recover reports the claimed engines to their pools (Claim runs first if
// the caller did not), then the handoffs whose engine died while no worker
// watched: their pools restart them now instead of after the supervisor's
// timeout.
func (w *HandoffWatcher) recover(ctx context.Context) {
	if w.live == nil {
		w.Claim()
	}
	for _, h := range w.claimed {
		w.report(ctx, h, true)
	}
	files, _ := filepath.Glob(filepath.Join(w.Engines.Dir(), "*.json"))
	for _, f := range files {
		h, err := engines.ReadHandoff(f)
		if err != nil || h.PoolID == "" || w.live[engineKey(h.PoolID, h.Epoch, h.PID)] {
			continue
		}
		uctx, cancel := context.WithTimeout(ctx, handoffUpdateTimeout)
		reply, err := w.Pools.Handoff(uctx, w.NodeID, pool.HandoffEvent{Handoff: h, Adopt: true, Gone: true})
		cancel()
		if errors.Is(err, control.ErrPoolNotFound) || errors.Is(err, control.ErrPoolEnded) {
			_ = os.Remove(f) // nobody's; a pool that restarts replaces the file itself
		}
		w.Log.Info("engine gone while the worker was down", "pool", h.PoolID, "epoch", h.Epoch, "pid", h.PID,
			"restarted", err == nil && reply.Accept)
	}
}

// report sends one handoff to its pool and fences the engine if the pool
// does not own it. A pool that cannot be reached keeps its engine: it
// exits by its lease if nobody supervises it.
func (w *HandoffWatcher) report(ctx context.Context, h pool.Handoff, adopt bool) {
	uctx, cancel := context.WithTimeout(ctx, handoffUpdateTimeout)
	defer cancel()
	log := w.Log.With("pool", h.PoolID, "epoch", h.Epoch, "pid", h.PID, "adopt", adopt)
	if w.BeforeReport != nil {
		w.BeforeReport(uctx)
	}
	reply, err := w.Pools.Handoff(uctx, w.NodeID, pool.HandoffEvent{Handoff: h, Adopt: adopt})
	switch {
	case err == nil && reply.Accept:
		if adopt {
			log.Info("engine adopted by its pool")
		} else {
			log.Info("handoff reported: pool ready", "url", h.URL)
		}
	case err == nil, errors.Is(err, control.ErrPoolNotFound), errors.Is(err, control.ErrPoolEnded):
		reason := reply.Reason
		if err != nil {
			reason = err.Error()
		}
		log.Info("fencing engine its pool does not own", "reason", reason)
		w.Engines.StopEpoch(h.PoolID, h.Epoch)
	default:
		log.Warn("cannot report handoff to its pool", "err", err)
	}
}
