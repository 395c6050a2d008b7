package activities

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/prometheus/client_golang/prometheus"
)

// Environment variables that mark an engine process as a pool's, so fencing
// can recognise it from /proc/<pid>/environ without trusting a bare pid.
const (
	EnvPoolID    = "LLORCH_POOL_ID"
	EnvPoolEpoch = "LLORCH_POOL_EPOCH"
)

// Engine process timings.
const (
	engineStopGrace     = 5 * time.Second
	engineHealthPoll    = 20 * time.Millisecond
	superviseInterval   = time.Second
	superviseHTTP       = 2 * time.Second
	superviseMaxFailed  = 3
	engineLogTailLines  = 20
	engineSpawnAttempts = 3 // a port taken between pick and bind is retried
)

// EngineHost gives the figures preflight checks against.
type EngineHost interface {
	Snapshot() node.Snapshot
	Inventory() node.Inventory
}

// EngineActivities start, supervise and stop a node's llama.cpp engines.
// They run on the node's own task queue. Use it by pointer: it holds the
// engines this worker started.
type EngineActivities struct {
	NodeID string
	// RuntimeDir holds engines/<pool>.json (handoff), engines/<pool>.pid and
	// engines/<pool>.log.
	RuntimeDir     string
	Local          *modelstore.LocalCatalog
	Host           EngineHost
	LlorchBin      string // the builtin engine is `LlorchBin engine ...`
	LlamaServerBin string // "" = llama-server is not installed
	LibDir         string // --lib-dir of the builtin engine
	Metrics        *EngineMetrics
	Threads        int // -t; 0 = 1
	Log            *slog.Logger

	mu    sync.Mutex
	procs map[string]*engineProc // by pool id
}

// engineProc is an engine this worker started. done closes once cmd.Wait
// has returned; exitCode and exitedAt are set before.
type engineProc struct {
	poolID   string
	epoch    int64
	pid      int
	url      string
	logPath  string
	started  time.Time
	cmd      *exec.Cmd
	done     chan struct{}
	exitCode int
	exitedAt time.Time
}

func (p *engineProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
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
}

// SuperviseInput names the engine StartEngine returned.
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
}

// EngineLive is the heartbeat detail of Supervise.
type EngineLive struct {
	At         time.Time
	SlotsTotal int
	SlotsFree  int
	Healthy    bool
}

// StopInput stops a pool's engine; Epoch 0 stops any epoch, otherwise an
// engine of a newer epoch is left alone.
type StopInput struct {
	PoolID string
	Epoch  int64
}

func (a *EngineActivities) log() *slog.Logger {
	if a.Log == nil {
		return slog.Default()
	}
	return a.Log
}

func (a *EngineActivities) enginesDir() string { return filepath.Join(a.RuntimeDir, "engines") }
func (a *EngineActivities) logPath(poolID string) string {
	return filepath.Join(a.enginesDir(), poolID+".log")
}
func (a *EngineActivities) pidPath(poolID string) string {
	return filepath.Join(a.enginesDir(), poolID+".pid")
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
	// Fencing: one engine per pool per node, whatever its epoch.
	a.stopPool(spec.PoolID, 0)
	if err := os.MkdirAll(a.enginesDir(), 0o755); err != nil {
		return pool.Handoff{}, fmt.Errorf("node %s: %w", a.NodeID, err)
	}
	if err := a.Local.Touch(in.SHA256, time.Now()); err != nil {
		a.log().Warn("cannot record model use", "sha256", in.SHA256, "err", err)
	}

	var p *engineProc
	var healthyAt time.Time
	for attempt := 1; ; attempt++ {
		p, err = a.spawn(spec, path, in.Epoch)
		if err != nil {
			return pool.Handoff{}, err
		}
		err = a.waitHealthy(ctx, p)
		if err == nil {
			healthyAt = time.Now().UTC()
			break
		}
		a.kill(p)
		a.forget(p)
		tail := logTail(p.logPath, engineLogTailLines)
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

	props := a.props(ctx, p.url)
	slots := props.TotalSlots
	if slots == 0 {
		slots = max(spec.Slots, 1)
	}
	h := pool.Handoff{
		Engine:        engineKind(spec.Engine),
		EngineVersion: props.BuildInfo,
		URL:           p.url,
		PoolID:        spec.PoolID,
		ReplicaID:     fmt.Sprintf("%s/%s/%d", a.NodeID, spec.PoolID, in.Epoch),
		Model:         pool.HandoffModel{ID: spec.ModelID, Path: path, SHA256: in.SHA256},
		DeviceMask:    spec.DeviceMask,
		Slots:         slots,
		PID:           p.pid,
		StartedAt:     p.started,
		HealthyAt:     healthyAt,
		Epoch:         in.Epoch,
	}
	if err := writeJSONAtomic(pool.HandoffPath(a.RuntimeDir, spec.PoolID), h); err != nil {
		a.kill(p)
		a.forget(p)
		return pool.Handoff{}, fmt.Errorf("node %s: pool %s: write handoff: %w", a.NodeID, spec.PoolID, err)
	}
	a.Metrics.ready(a.NodeID, spec.PoolID, healthyAt.Sub(p.started))
	a.log().Info("engine ready", "pool", spec.PoolID, "epoch", in.Epoch, "url", p.url, "pid", p.pid,
		"load_ms", time.Since(p.started).Milliseconds())
	return h, nil
}

func engineKind(e pool.Engine) pool.Engine {
	if e == "" {
		return pool.Builtin
	}
	return e
}

// pidRecord is engines/<pool>.pid: written at spawn, before the handoff, so
// an engine that never got healthy can still be fenced.
type pidRecord struct {
	PID   int   `json:"pid"`
	Epoch int64 `json:"epoch"`
}

// spawn starts the engine process and its reaper.
func (a *EngineActivities) spawn(spec pool.Spec, modelPath string, epoch int64) (*engineProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("node %s: pick a port: %w", a.NodeID, err)
	}
	threads := a.Threads
	if threads <= 0 {
		threads = 1
	}
	slots := max(spec.Slots, 1)
	common := []string{
		"-m", modelPath,
		"--host", "127.0.0.1", "--port", strconv.Itoa(port),
		"-c", strconv.Itoa(max(spec.CtxSize, 0)),
		"-np", strconv.Itoa(slots),
		"-t", strconv.Itoa(threads),
		"--alias", spec.ModelID,
	}
	var bin string
	var args []string
	switch engineKind(spec.Engine) {
	case pool.Builtin:
		if a.LlorchBin == "" {
			return nil, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("node %s: the llorch binary is not configured", a.NodeID), pool.ErrEngineStart, nil)
		}
		bin = a.LlorchBin
		args = append([]string{"engine"}, common...)
		if a.LibDir != "" {
			args = append(args, "--lib-dir", a.LibDir)
		}
	case pool.LlamaServer:
		if a.LlamaServerBin == "" {
			return nil, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("llama-server is not installed on node %s", a.NodeID), pool.ErrEngineStart, nil)
		}
		bin = a.LlamaServerBin
		args = append(common, "-ngl", strconv.Itoa(spec.NGPULayers), "--metrics", "--no-webui")
	default:
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: unknown engine %q", a.NodeID, spec.PoolID, spec.Engine), pool.ErrEngineStart, nil)
	}

	logPath := a.logPath(spec.PoolID)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("node %s: engine log: %w", a.NodeID, err)
	}
	defer logf.Close()

	cmd := exec.Command(bin, args...)
	cmd.Env = engineEnv(os.Environ(), spec.DeviceMask, spec.PoolID, epoch)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := startLocked(cmd); err != nil {
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: start %s: %v", a.NodeID, spec.PoolID, bin, err), pool.ErrEngineStart, err)
	}
	p := &engineProc{
		poolID:  spec.PoolID,
		epoch:   epoch,
		pid:     cmd.Process.Pid,
		url:     "http://127.0.0.1:" + strconv.Itoa(port),
		logPath: logPath,
		started: time.Now().UTC(),
		cmd:     cmd,
		done:    make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		p.exitCode = exitCode(cmd.ProcessState)
		p.exitedAt = time.Now()
		close(p.done)
		a.log().Info("engine exited", "pool", p.poolID, "epoch", p.epoch, "pid", p.pid, "code", p.exitCode)
	}()
	a.mu.Lock()
	if a.procs == nil {
		a.procs = map[string]*engineProc{}
	}
	a.procs[spec.PoolID] = p
	a.mu.Unlock()
	if err := writeJSONAtomic(a.pidPath(spec.PoolID), pidRecord{PID: p.pid, Epoch: epoch}); err != nil {
		a.log().Warn("cannot write engine pid file", "pool", spec.PoolID, "err", err)
	}
	a.log().Info("engine started", "pool", spec.PoolID, "epoch", epoch, "pid", p.pid, "url", p.url, "bin", bin)
	return p, nil
}

// spawner starts engines from one goroutine locked to its OS thread for
// good: Pdeathsig fires when the thread that forked the child exits, and a
// thread the Go runtime retires would kill a healthy engine.
var (
	spawnOnce sync.Once
	spawnCh   chan spawnReq
)

type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

func startLocked(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives as long as the worker
			for r := range spawnCh {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, err: make(chan error, 1)}
	spawnCh <- r
	return <-r.err
}

// engineEnv is the worker's environment with the GPU mask and the pool
// marker replaced.
func engineEnv(base []string, mask, poolID string, epoch int64) []string {
	env := make([]string, 0, len(base)+3)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "CUDA_VISIBLE_DEVICES", EnvPoolID, EnvPoolEpoch:
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"CUDA_VISIBLE_DEVICES="+mask,
		EnvPoolID+"="+poolID,
		EnvPoolEpoch+"="+strconv.FormatInt(epoch, 10))
}

func exitCode(st *os.ProcessState) int {
	if st == nil {
		return -1
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}

func exitReason(p *engineProc) string {
	r := fmt.Sprintf("engine exited with code %d", p.exitCode)
	if p.exitCode > 128 {
		r += fmt.Sprintf(" (signal %s)", syscall.Signal(p.exitCode-128))
	}
	return r
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitHealthy polls /health until 200, the process exits or ctx ends.
func (a *EngineActivities) waitHealthy(ctx context.Context, p *engineProc) error {
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(engineHealthPoll)
	defer tick.Stop()
	lastBeat := time.Time{}
	for {
		select {
		case <-p.done:
			return temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("node %s: pool %s: engine exited with code %d while loading; last log lines:\n%s",
					a.NodeID, p.poolID, p.exitCode, logTail(p.logPath, engineLogTailLines)),
				pool.ErrEngineStart, nil)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if time.Since(lastBeat) >= time.Second {
			activity.RecordHeartbeat(ctx, "loading")
			lastBeat = time.Now()
		}
		if code, _, err := httpGet(ctx, client, p.url+"/health"); err == nil && code == http.StatusOK {
			// Exited between the answer and now? Then it is not healthy.
			if p.exited() {
				continue
			}
			return nil
		}
	}
}

func httpGet(ctx context.Context, client *http.Client, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	res, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	return res.StatusCode, b, err
}

type engineProps struct {
	TotalSlots int    `json:"total_slots"`
	BuildInfo  string `json:"build_info"`
}

func (a *EngineActivities) props(ctx context.Context, url string) engineProps {
	var pr engineProps
	code, b, err := httpGet(ctx, &http.Client{Timeout: superviseHTTP}, url+"/props")
	if err == nil && code == http.StatusOK {
		err = json.Unmarshal(b, &pr)
	} else if err == nil {
		err = fmt.Errorf("status %d", code)
	}
	if err != nil {
		a.log().Warn("engine /props", "url", url, "err", err)
	}
	return pr
}

// logTail is the last n lines of a log file.
func logTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const maxRead = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > maxRead {
		_, _ = f.Seek(st.Size()-maxRead, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// Supervise watches the engine until it exits, stops answering /health, or
// the workflow cancels the activity (drain, stop), which stops the engine.
func (a *EngineActivities) Supervise(ctx context.Context, in SuperviseInput) (SuperviseResult, error) {
	res, err := a.supervise(ctx, in)
	a.Metrics.ended(a.NodeID, in.PoolID, res)
	return res, err
}

func (a *EngineActivities) supervise(ctx context.Context, in SuperviseInput) (SuperviseResult, error) {
	p := a.lookup(in.PoolID, in.Epoch, in.PID)
	if p == nil {
		return SuperviseResult{Exited: true, ExitCode: -1, Reason: "engine is not running on this worker (worker restarted)",
			LogTail: logTail(a.logPath(in.PoolID), engineLogTailLines)}, nil
	}
	url := in.URL
	if url == "" {
		url = p.url
	}
	client := &http.Client{Timeout: superviseHTTP}
	tick := time.NewTicker(superviseInterval)
	defer tick.Stop()
	failures := 0
	var lastErr string
	for {
		if p.exited() {
			return SuperviseResult{Exited: true, ExitCode: p.exitCode, Reason: exitReason(p),
				LogTail: logTail(p.logPath, engineLogTailLines), UptimeMs: p.exitedAt.Sub(p.started).Milliseconds()}, nil
		}
		if a.lookup(in.PoolID, in.Epoch, in.PID) == nil {
			return SuperviseResult{Exited: true, ExitCode: -1, Reason: fmt.Sprintf("engine epoch %d was replaced on this worker", in.Epoch),
				UptimeMs: time.Since(p.started).Milliseconds()}, nil
		}
		live := EngineLive{At: time.Now().UTC()}
		code, _, err := httpGet(ctx, client, url+"/health")
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
			if p.exited() { // it died while we asked: report the exit
				continue
			}
			a.kill(p)
			a.forget(p)
			code := -1
			if p.exited() {
				code = p.exitCode
			}
			return SuperviseResult{Exited: true, ExitCode: code,
				Reason:   fmt.Sprintf("health check failed %d times: %s", failures, lastErr),
				LogTail:  logTail(p.logPath, engineLogTailLines),
				UptimeMs: time.Since(p.started).Milliseconds()}, nil
		}
		if live.Healthy {
			live.SlotsTotal, live.SlotsFree = slotCounts(ctx, client, url)
		}
		activity.RecordHeartbeat(ctx, live)
		a.Metrics.live(a.NodeID, in.PoolID, live)
		select {
		case <-ctx.Done():
		case <-p.done:
			continue
		case <-tick.C:
			continue
		}
		break
	}
	// Cancelled: the workflow drains or stops the pool.
	a.stopPool(in.PoolID, in.Epoch)
	return SuperviseResult{Reason: "stopped", UptimeMs: time.Since(p.started).Milliseconds()}, nil
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
	client := &http.Client{Timeout: superviseHTTP}
	start := time.Now()
	deadline := start.Add(in.Deadline)
	for {
		total, free := slotCounts(ctx, client, in.URL)
		busy := total - free
		if busy == 0 {
			return DrainResult{Idle: true, WaitedMs: time.Since(start).Milliseconds()}, nil
		}
		if time.Now().After(deadline) {
			a.log().Info("drain deadline passed with generations in flight", "pool", in.PoolID, "busy", busy)
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

func slotCounts(ctx context.Context, client *http.Client, url string) (total, free int) {
	code, b, err := httpGet(ctx, client, url+"/slots")
	if err != nil || code != http.StatusOK {
		return 0, 0
	}
	var slots []struct {
		ID           int  `json:"id"`
		IsProcessing bool `json:"is_processing"`
	}
	if json.Unmarshal(b, &slots) != nil {
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

// lookup is the engine of pool at epoch (and pid, when given) this worker runs.
func (a *EngineActivities) lookup(poolID string, epoch int64, pid int) *engineProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.procs[poolID]
	if p == nil || p.epoch != epoch || (pid != 0 && p.pid != pid) {
		return nil
	}
	return p
}

// forget drops p from the map if it is still the pool's engine.
func (a *EngineActivities) forget(p *engineProc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.procs[p.poolID] == p {
		delete(a.procs, p.poolID)
	}
}

// StopEngine stops the pool's engine and removes its handoff file. It is
// idempotent; an engine of an epoch newer than in.Epoch is left running.
func (a *EngineActivities) StopEngine(ctx context.Context, in StopInput) error {
	a.stopPool(in.PoolID, in.Epoch)
	return nil
}

// stopPool stops every engine of the pool with epoch <= maxEpoch (0: any):
// the one in the map and those recorded in the handoff and pid files (left
// by an earlier worker), then removes those files.
func (a *EngineActivities) stopPool(poolID string, maxEpoch int64) {
	covers := func(epoch int64) bool { return maxEpoch == 0 || epoch <= maxEpoch }
	a.mu.Lock()
	p := a.procs[poolID]
	a.mu.Unlock()
	if p != nil && covers(p.epoch) {
		a.kill(p)
		a.forget(p)
	}
	var h pool.Handoff
	hpath := pool.HandoffPath(a.RuntimeDir, poolID)
	hok := readJSON(hpath, &h) == nil
	var rec pidRecord
	ppath := a.pidPath(poolID)
	pok := readJSON(ppath, &rec) == nil
	if hok && covers(h.Epoch) {
		a.killForeign(poolID, h.PID)
		os.Remove(hpath)
	} else if !hok {
		os.Remove(hpath) // unreadable: stale
	}
	if pok && covers(rec.Epoch) {
		a.killForeign(poolID, rec.PID)
		os.Remove(ppath)
	} else if !pok {
		os.Remove(ppath)
	}
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// kill stops an engine this worker started: SIGTERM to its process group,
// engineStopGrace, then SIGKILL; it returns once the reaper saw it exit.
func (a *EngineActivities) kill(p *engineProc) {
	if p.exited() {
		return
	}
	_ = syscall.Kill(-p.pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(engineStopGrace):
	}
	a.log().Warn("engine ignored SIGTERM; killing", "pool", p.poolID, "pid", p.pid)
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(engineStopGrace):
		a.log().Error("engine did not exit after SIGKILL", "pool", p.poolID, "pid", p.pid)
	}
}

// killForeign stops a pid recorded on disk, but only if /proc says it is an
// engine of poolID: a reused pid is never killed.
func (a *EngineActivities) killForeign(poolID string, pid int) {
	if pid <= 0 {
		return
	}
	a.mu.Lock()
	for _, p := range a.procs {
		if p.pid == pid && !p.exited() {
			a.mu.Unlock()
			a.kill(p)
			a.forget(p)
			return
		}
	}
	a.mu.Unlock()
	if !isPoolEngine(pid, poolID) {
		return
	}
	a.log().Info("fencing engine of an earlier worker", "pool", poolID, "pid", pid)
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(pid, poolID, engineStopGrace) {
		return
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = syscall.Kill(pid, syscall.SIGKILL)
	waitGone(pid, poolID, engineStopGrace)
}

func waitGone(pid int, poolID string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !isPoolEngine(pid, poolID) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !isPoolEngine(pid, poolID)
}

// isPoolEngine says whether pid is a live (not zombie) process whose
// environment marks it as an engine of poolID.
func isPoolEngine(pid int, poolID string) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return false
	}
	want := EnvPoolID + "=" + poolID
	for _, kv := range bytes.Split(env, []byte{0}) {
		if string(kv) == want {
			return true
		}
	}
	return false
}

// EngineMetrics are a node's pool and engine figures.
type EngineMetrics struct {
	Ready      *prometheus.GaugeVec
	Exits      *prometheus.CounterVec
	Handoff    *prometheus.HistogramVec
	SlotsTotal *prometheus.GaugeVec
	SlotsFree  *prometheus.GaugeVec
}

// NewEngineMetrics registers the engine metrics on reg.
func NewEngineMetrics(reg prometheus.Registerer) *EngineMetrics {
	m := &EngineMetrics{
		Ready: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_ready", Help: "1 while the pool's engine on this node is ready.",
		}, []string{"node_id", "pool_id"}),
		Exits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_engine_exits_total", Help: "Engine runs that ended, by reason (exited, health, stopped, gone).",
		}, []string{"node_id", "pool_id", "reason"}),
		Handoff: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_engine_handoff_seconds", Help: "Engine spawn to first /health 200 and handoff written.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}, []string{"node_id"}),
		SlotsTotal: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_slots_total", Help: "Slots of the pool's engine.",
		}, []string{"node_id", "pool_id"}),
		SlotsFree: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_pool_slots_free", Help: "Idle slots of the pool's engine.",
		}, []string{"node_id", "pool_id"}),
	}
	reg.MustRegister(m.Ready, m.Exits, m.Handoff, m.SlotsTotal, m.SlotsFree)
	return m
}

func (m *EngineMetrics) ready(nodeID, poolID string, load time.Duration) {
	if m == nil {
		return
	}
	m.Ready.WithLabelValues(nodeID, poolID).Set(1)
	m.Handoff.WithLabelValues(nodeID).Observe(load.Seconds())
}

func (m *EngineMetrics) live(nodeID, poolID string, l EngineLive) {
	if m == nil {
		return
	}
	m.SlotsTotal.WithLabelValues(nodeID, poolID).Set(float64(l.SlotsTotal))
	m.SlotsFree.WithLabelValues(nodeID, poolID).Set(float64(l.SlotsFree))
}

func (m *EngineMetrics) ended(nodeID, poolID string, r SuperviseResult) {
	if m == nil {
		return
	}
	reason := "gone" // not running on this worker any more
	switch {
	case r.Reason == "stopped":
		reason = "stopped"
	case strings.HasPrefix(r.Reason, "health check failed"):
		reason = "health"
	case r.Exited && r.ExitCode != -1:
		reason = "exited"
	}
	m.Exits.WithLabelValues(nodeID, poolID, reason).Inc()
	m.Ready.WithLabelValues(nodeID, poolID).Set(0)
	m.SlotsFree.WithLabelValues(nodeID, poolID).Set(0)
}
