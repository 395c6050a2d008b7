package activities

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"go.temporal.io/sdk/activity"

	"github.com/llorch/llorch/engine/protocol"
	"github.com/llorch/llorch/inventory"
)

// SuperviseInput names the engine StartEngine returned (or the pool
// workflow adopted).
type SuperviseInput struct {
	PoolID string
	Epoch  int64
	URL    string
	PID    int
}

// SuperviseResult is why supervision ended.
type SuperviseResult struct {
	Exited   bool
	ExitCode int
	Reason   string
	LogTail  string
	UptimeMs int64
	// WorkerStopped: the worker shut down (SIGTERM) and stopped the engine
	// with it; the node leaves, the engine did not fail.
	WorkerStopped bool `json:",omitempty"`
}

// EngineLive is the heartbeat detail of Supervise.
type EngineLive struct {
	At         time.Time
	SlotsTotal int
	SlotsFree  int
	Healthy    bool
	RSSBytes   uint64 // resident memory of the engine process
	VRAMBytes  uint64 // GPU memory it holds (NVML), 0 on CPU-only nodes
}

// Supervise watches the engine until it exits, stops answering /health, or
// the workflow cancels the activity (drain, stop), which stops the engine.
// Each beat renews the engine's supervisor lease.
func (a *EngineActivities) Supervise(ctx context.Context, in SuperviseInput) (SuperviseResult, error) {
	res, err := a.supervise(ctx, in)
	a.Metrics.ended(a.NodeID, in.PoolID, res)
	return res, err
}

func (a *EngineActivities) supervise(ctx context.Context, in SuperviseInput) (SuperviseResult, error) {
	p := a.Table.Lookup(in.PoolID, in.Epoch, in.PID)
	if p == nil {
		return SuperviseResult{Exited: true, ExitCode: -1, Reason: "engine is not running on this worker (worker restarted)",
			LogTail: a.Table.LogTail(in.PoolID, in.Epoch)}, nil
	}
	url := in.URL
	if url == "" {
		url = p.URL
	}
	eng := protocol.Client{URL: url, HTTP: &http.Client{Timeout: superviseHTTP}}
	tick := time.NewTicker(superviseInterval)
	defer tick.Stop()
	failures := 0
	var lastErr string
	for {
		if err := a.Table.RenewLease(in.PoolID, in.Epoch); err != nil {
			a.Table.Logger().Warn("cannot renew engine lease", "pool", in.PoolID, "err", err)
		}
		if p.Exited() {
			return SuperviseResult{Exited: true, ExitCode: p.ExitCode(), Reason: p.ExitReason(),
				LogTail: a.Table.LogTail(p.PoolID, p.Epoch), UptimeMs: p.ExitedAt().Sub(p.Started).Milliseconds()}, nil
		}
		if a.Table.Lookup(in.PoolID, in.Epoch, in.PID) == nil {
			return SuperviseResult{Exited: true, ExitCode: -1, Reason: fmt.Sprintf("engine epoch %d was stopped on this worker", in.Epoch),
				UptimeMs: time.Since(p.Started).Milliseconds()}, nil
		}
		live := EngineLive{At: time.Now().UTC()}
		code, err := eng.Health(ctx)
		if ctx.Err() != nil {
			break
		}
		switch {
		case err != nil:
			failures++
			lastErr = err.Error()
		case code != http.StatusOK:
			failures++
			lastErr = fmt.Sprintf("/health answered %d", code)
		default:
			failures = 0
			live.Healthy = true
		}
		if failures >= superviseMaxFailed {
			if p.Exited() { // it died while we asked: report the exit
				continue
			}
			a.Table.Kill(p)
			code := -1
			if p.Exited() {
				code = p.ExitCode()
			}
			return SuperviseResult{Exited: true, ExitCode: code,
				Reason:   fmt.Sprintf("health check failed %d times: %s", failures, lastErr),
				LogTail:  a.Table.LogTail(p.PoolID, p.Epoch),
				UptimeMs: time.Since(p.Started).Milliseconds()}, nil
		}
		if live.Healthy {
			live.SlotsTotal, live.SlotsFree = slotCounts(ctx, eng)
		}
		live.RSSBytes, _ = inventory.ProcessRSS(p.PID)
		if a.Host != nil {
			live.VRAMBytes = a.Host.ProcessGPUMemory(p.PID)
		}
		activity.RecordHeartbeat(ctx, live)
		a.Metrics.live(a.NodeID, in.PoolID, live)
		select {
		case <-ctx.Done():
		case <-activity.GetWorkerStopChannel(ctx):
			// A graceful stop: the node leaves and takes its engines along.
			a.Table.StopEpoch(in.PoolID, in.Epoch)
			return SuperviseResult{Reason: "worker stopped", WorkerStopped: true, UptimeMs: time.Since(p.Started).Milliseconds()}, nil
		case <-p.Done():
			continue
		case <-tick.C:
			continue
		}
		break
	}
	// Cancelled: the workflow drains, reloads or stops the pool.
	a.Table.StopEpoch(in.PoolID, in.Epoch)
	return SuperviseResult{Reason: "stopped", UptimeMs: time.Since(p.Started).Milliseconds()}, nil
}

// DrainInput lets a pool's in-flight generations finish before it stops.
type DrainInput struct {
	PoolID   string
	URL      string
	Deadline time.Duration
}

// DrainResult says whether the engine went idle in time.
type DrainResult struct {
	Idle     bool  `json:"idle"`
	Busy     int   `json:"busy_at_deadline"`
	WaitedMs int64 `json:"waited_ms"`
}

// DrainEngine waits until no slot of the engine is processing, or the
// deadline passes; the caller then stops the engine. An engine that does not
// answer counts as idle: there is nothing left to wait for.
func (a *EngineActivities) DrainEngine(ctx context.Context, in DrainInput) (DrainResult, error) {
	eng := protocol.Client{URL: in.URL, HTTP: &http.Client{Timeout: superviseHTTP}}
	start := time.Now()
	deadline := start.Add(in.Deadline)
	for {
		total, free := slotCounts(ctx, eng)
		busy := total - free
		if busy == 0 {
			return DrainResult{Idle: true, WaitedMs: time.Since(start).Milliseconds()}, nil
		}
		if time.Now().After(deadline) {
			a.Table.Logger().Info("drain deadline passed with generations in flight", "pool", in.PoolID, "busy", busy)
			return DrainResult{Busy: busy, WaitedMs: time.Since(start).Milliseconds()}, nil
		}
		activity.RecordHeartbeat(ctx, busy)
		select {
		case <-ctx.Done():
			return DrainResult{Busy: busy, WaitedMs: time.Since(start).Milliseconds()}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// slotCounts are the engine's slots and idle ones; 0, 0 when it does not
// answer.
func slotCounts(ctx context.Context, eng protocol.Client) (total, free int) {
	slots, err := eng.Slots(ctx)
	if err != nil {
		return 0, 0
	}
	for _, s := range slots {
		total++
		if !s.IsProcessing {
			free++
		}
	}
	return total, free
}

// StopInput stops a pool's engines: Epoch 0 every epoch, otherwise that
// epoch only.
type StopInput struct {
	PoolID string
	Epoch  int64
}

// StopEngine stops the pool's engine (and removes its handoff file). It is
// idempotent.
func (a *EngineActivities) StopEngine(ctx context.Context, in StopInput) error {
	if in.Epoch == 0 {
		a.Table.StopPool(in.PoolID, nil)
	} else {
		a.Table.StopEpoch(in.PoolID, in.Epoch)
	}
	return nil
}
