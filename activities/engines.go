package activities

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/engine/protocol"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/workers/engines"
)

// Engine process timings.
const (
	engineHealthPoll    = 20 * time.Millisecond
	superviseInterval   = time.Second
	superviseHTTP       = 2 * time.Second
	superviseMaxFailed  = 3
	engineSpawnAttempts = 3 // a port taken between pick and bind is retried
)

// EngineHost gives the figures preflight checks against.
type EngineHost interface {
	Snapshot() node.Snapshot
	Inventory() node.Inventory
	ProcessGPUMemory(pid int) uint64
}

// EngineActivities start, supervise and stop a node's llama.cpp engines.
// They run on the node's own task queue; the engines themselves are in
// Table, whose Logger they log to.
type EngineActivities struct {
	NodeID  string
	Table   *engines.Table
	Local   *modelstore.LocalCatalog
	Host    EngineHost
	Metrics *EngineMetrics
}

// PreflightInput asks whether the node can hold a pool's engine now.
type PreflightInput struct {
	Spec   pool.Spec
	SHA256 string
}

// StartInput starts a pool's engine at an epoch.
type StartInput struct {
	Spec   pool.Spec
	SHA256 string
	Epoch  int64
	// Keep is an epoch left running (a reload's serving engine, stopped
	// once the new one is ready); every other engine of the pool is fenced.
	Keep int64
}

// Preflight checks that the model is staged and that the node has the memory
// the engine needs: VRAM on the masked GPUs, else RAM.
func (a *EngineActivities) Preflight(ctx context.Context, in PreflightInput) error {
	path, err := a.modelPath(in.Spec, in.SHA256)
	if err != nil {
		return err
	}
	ctxSize := uint64(0)
	if in.Spec.CtxSize > 0 {
		ctxSize = uint64(in.Spec.CtxSize)
	}
	md, err := modelstore.ReadMetadata(path, ctxSize)
	if err != nil {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: model %s: %v", a.NodeID, in.Spec.PoolID, path, err), pool.ErrEngineStart, err)
	}
	if in.Spec.DeviceMask != "" && in.Spec.NGPULayers != 0 {
		return a.checkVRAM(in.Spec, md.EstimatedVRAMBytes)
	}
	free, err := inventory.MemInfo("MemAvailable")
	if err != nil {
		return fmt.Errorf("node %s: read free memory: %w", a.NodeID, err)
	}
	if md.EstimatedRAMBytes > free {
		return temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s needs %d bytes of RAM, %d free", a.NodeID, in.Spec.PoolID, md.EstimatedRAMBytes, free),
			pool.ErrInsufficientRAM, nil)
	}
	return nil
}

func (a *EngineActivities) checkVRAM(spec pool.Spec, need uint64) error {
	fail := func(msg string) error {
		return temporal.NewNonRetryableApplicationError(msg, pool.ErrInsufficientVRAM, nil)
	}
	if a.Host == nil {
		return fail(fmt.Sprintf("node %s: pool %s asks for GPUs [%s] but the worker reports no GPUs", a.NodeID, spec.PoolID, spec.DeviceMask))
	}
	snap := a.Host.Snapshot()
	byIndex := map[int]node.GPUUsage{}
	for _, g := range snap.GPUs {
		byIndex[g.Index] = g
	}
	var free uint64
	seen := map[int]bool{}
	for _, f := range strings.Split(spec.DeviceMask, ",") {
		f = strings.TrimSpace(f)
		idx, err := strconv.Atoi(f)
		if err != nil || idx < 0 {
			return fail(fmt.Sprintf("node %s: pool %s: device mask [%s] names %q, which is not a GPU index of this node", a.NodeID, spec.PoolID, spec.DeviceMask, f))
		}
		g, ok := byIndex[idx]
		if !ok {
			return fail(fmt.Sprintf("node %s: pool %s: device mask [%s] names GPU %d, which this node does not have (it has %d GPUs)", a.NodeID, spec.PoolID, spec.DeviceMask, idx, len(snap.GPUs)))
		}
		if !seen[idx] {
			seen[idx] = true
			free += g.MemoryFreeBytes
		}
	}
	if need > free {
		return fail(fmt.Sprintf("node %s: pool %s needs %d bytes of VRAM on GPUs [%s], %d free", a.NodeID, spec.PoolID, need, spec.DeviceMask, free))
	}
	return nil
}

// modelPath finds the staged model file or fails with ErrModelNotStaged.
func (a *EngineActivities) modelPath(spec pool.Spec, sha string) (string, error) {
	if a.Local == nil {
		return "", temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: no local model catalog", a.NodeID, spec.PoolID), pool.ErrModelNotStaged, nil)
	}
	_, ok, err := a.Local.Get(sha)
	if err != nil {
		return "", fmt.Errorf("node %s: local model catalog: %w", a.NodeID, err)
	}
	if !ok {
		return "", temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: model %s (sha256 %s) is not staged on this node", a.NodeID, spec.PoolID, spec.ModelID, sha),
			pool.ErrModelNotStaged, nil)
	}
	return a.Local.Path(sha), nil
}

// StartEngine fences any earlier engine of the pool on this node, spawns the
// engine, waits for /health 200 and writes the handoff file. The engine keeps
// running after it returns; Supervise watches it.
func (a *EngineActivities) StartEngine(ctx context.Context, in StartInput) (pool.Handoff, error) {
	spec := in.Spec
	if err := pool.ValidateID(spec.PoolID); err != nil {
		return pool.Handoff{}, temporal.NewNonRetryableApplicationError(err.Error(), pool.ErrEngineStart, nil)
	}
	path, err := a.modelPath(spec, in.SHA256)
	if err != nil {
		return pool.Handoff{}, err
	}
	// Fencing: one engine per pool per node (two while a reload switches).
	a.Table.StopPool(spec.PoolID, func(e int64) bool { return in.Keep == 0 || e != in.Keep })
	if err := os.MkdirAll(a.Table.Dir(), 0o755); err != nil {
		return pool.Handoff{}, fmt.Errorf("node %s: %w", a.NodeID, err)
	}
	if err := a.Local.Touch(in.SHA256, time.Now()); err != nil {
		a.Table.Logger().Warn("cannot record model use", "sha256", in.SHA256, "err", err)
	}

	var p *engines.Proc
	var healthyAt time.Time
	for attempt := 1; ; attempt++ {
		p, err = a.Table.Spawn(spec, path, in.Epoch)
		if err != nil {
			return pool.Handoff{}, err
		}
		err = a.waitHealthy(ctx, p)
		if err == nil {
			healthyAt = time.Now().UTC()
			break
		}
		a.Table.Kill(p)
		tail := a.Table.LogTail(p.PoolID, p.Epoch)
		if ctx.Err() != nil {
			return pool.Handoff{}, ctx.Err()
		}
		if attempt < engineSpawnAttempts && strings.Contains(tail, "address already in use") {
			continue
		}
		var app *temporal.ApplicationError
		if errors.As(err, &app) {
			return pool.Handoff{}, err
		}
		return pool.Handoff{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: engine did not become healthy: %v\n%s", a.NodeID, spec.PoolID, err, tail), pool.ErrEngineStart, err)
	}

	props := a.props(ctx, p.URL)
	slots := props.TotalSlots
	if slots == 0 {
		slots = max(spec.Slots, 1)
	}
	h := pool.Handoff{
		Engine:        engines.Kind(spec.Engine),
		EngineVersion: props.BuildInfo,
		URL:           p.URL,
		PoolID:        spec.PoolID,
		ReplicaID:     fmt.Sprintf("%s/%s/%d", a.NodeID, spec.PoolID, in.Epoch),
		Model:         pool.HandoffModel{ID: spec.ModelID, Path: path, SHA256: in.SHA256},
		DeviceMask:    spec.DeviceMask,
		Slots:         slots,
		PID:           p.PID,
		StartedAt:     p.Started,
		HealthyAt:     healthyAt,
		Epoch:         in.Epoch,
	}
	a.Table.PruneLogs(spec.PoolID, in.Epoch)
	if err := a.Table.WriteHandoff(h); err != nil {
		a.Table.Kill(p)
		return pool.Handoff{}, fmt.Errorf("node %s: pool %s: write handoff: %w", a.NodeID, spec.PoolID, err)
	}
	a.Metrics.ready(a.NodeID, spec.PoolID, healthyAt.Sub(p.Started))
	a.Table.Logger().Info("engine ready", "pool", spec.PoolID, "epoch", in.Epoch, "url", p.URL, "pid", p.PID,
		"load_ms", time.Since(p.Started).Milliseconds())
	return h, nil
}

// waitHealthy polls /health until 200, the process exits or ctx ends.
func (a *EngineActivities) waitHealthy(ctx context.Context, p *engines.Proc) error {
	eng := protocol.Client{URL: p.URL, HTTP: &http.Client{Timeout: time.Second}}
	tick := time.NewTicker(engineHealthPoll)
	defer tick.Stop()
	lastBeat := time.Time{}
	for {
		select {
		case <-p.Done():
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("node %s: pool %s: engine exited with code %d while loading; last log lines:\n%s",
					a.NodeID, p.PoolID, p.ExitCode(), a.Table.LogTail(p.PoolID, p.Epoch)),
				pool.ErrEngineStart, nil)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if time.Since(lastBeat) >= time.Second {
			activity.RecordHeartbeat(ctx, "loading")
			_ = a.Table.RenewLease(p.PoolID, p.Epoch) // a long load is supervised too
			lastBeat = time.Now()
		}
		if code, err := eng.Health(ctx); err == nil && code == http.StatusOK {
			// Exited between the answer and now? Then it is not healthy.
			if p.Exited() {
				continue
			}
			return nil
		}
	}
}

func (a *EngineActivities) props(ctx context.Context, url string) protocol.Props {
	pr, err := protocol.Client{URL: url, HTTP: &http.Client{Timeout: superviseHTTP}}.Props(ctx)
	if err != nil {
		a.Table.Logger().Warn("engine /props", "url", url, "err", err)
	}
	return pr
}
