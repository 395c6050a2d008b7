package activities

import (
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
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/cpuset"
	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/inventory"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
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
	ProcessGPUMemory(pid int) uint64
}

// EngineActivities start, supervise and stop a node's llama.cpp engines.
// They run on the node's own task queue. Use it by pointer: it holds the
// engines this worker started.
type EngineActivities struct {
	NodeID string
	// RuntimeDir holds engines/<pool>.json (the handoff of the serving
	// engine) and per epoch engines/<pool>@<epoch>.log and .lease.
	RuntimeDir     string
	Local          *modelstore.LocalCatalog
	Host           EngineHost
	LlorchBin      string // the builtin engine is `LlorchBin engine ...`
	LlamaServerBin string // "" = llama-server is not installed
	LibDir         string // --lib-dir of the builtin engine
	Metrics        *EngineMetrics
	Threads        int // -t; 0 = 1
	// OrphanTimeout: how long a built-in engine outlives its supervisor (a
	// dead worker) before it exits; a worker back within it adopts the
	// engine. 0 = one minute.
	OrphanTimeout time.Duration
	// CPUs the engines run on (nil: any); the worker keeps off them.
	CPUs *unix.CPUSet
	Log  *slog.Logger

	mu    sync.Mutex
	procs map[procKey]*engineProc
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

func (a *EngineActivities) log() *slog.Logger {
	if a.Log == nil {
		return slog.Default()
	}
	return a.Log
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
	a.stopPool(spec.PoolID, func(e int64) bool { return in.Keep == 0 || e != in.Keep })
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
	a.pruneLogs(spec.PoolID, in.Epoch)
	// The handoff names the serving engine: on a reload, writing it is the
	// switch.
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
	detached := false
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
		// It outlives a worker restart (the new worker adopts it), not a
		// worker that stays away.
		lease := a.leasePath(spec.PoolID, epoch)
		if err := engine.TouchLease(lease); err != nil {
			return nil, fmt.Errorf("node %s: engine lease: %w", a.NodeID, err)
		}
		args = append(args, "--supervisor-lease", lease, "--supervisor-timeout", a.orphanTimeout().String())
		detached = true
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

	logPath := a.logPath(spec.PoolID, epoch)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("node %s: engine log: %w", a.NodeID, err)
	}
	defer logf.Close()

	cmd := exec.Command(bin, args...)
	cmd.Env = engineEnv(os.Environ(), a.NodeID, spec.DeviceMask, spec.PoolID, epoch)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Built-in engines run in their own session and end by their lease;
	// llama-server cannot watch one, so it dies with its worker.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if detached {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := startLocked(cmd, a.CPUs); err != nil {
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
	a.register(p)
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
	cmd  *exec.Cmd
	cpus *unix.CPUSet
	err  chan error
}

// startLocked starts cmd from the spawner thread; with cpus, the child
// inherits them as its affinity from that thread (the Go runtime starts no
// thread from a locked one, so the worker's own threads are unaffected).
func startLocked(cmd *exec.Cmd, cpus *unix.CPUSet) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives as long as the worker
			for r := range spawnCh {
				if r.cpus != nil {
					if err := unix.SchedSetaffinity(0, r.cpus); err != nil {
						r.err <- fmt.Errorf("pin to CPUs %s: %w", cpuset.Format(*r.cpus), err)
						continue
					}
				}
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, cpus: cpus, err: make(chan error, 1)}
	spawnCh <- r
	return <-r.err
}

// engineEnv is the worker's environment with the GPU mask and the pool
// marker replaced.
func engineEnv(base []string, nodeID, mask, poolID string, epoch int64) []string {
	env := make([]string, 0, len(base)+3)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "CUDA_VISIBLE_DEVICES", EnvNodeID, EnvPoolID, EnvPoolEpoch:
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"CUDA_VISIBLE_DEVICES="+mask,
		EnvNodeID+"="+nodeID,
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
			_ = engine.TouchLease(a.leasePath(p.poolID, p.epoch)) // a long load is supervised too
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

func (a *EngineActivities) orphanTimeout() time.Duration {
	if a.OrphanTimeout <= 0 {
		return time.Minute
	}
	return a.OrphanTimeout
}

// pruneLogs keeps the logs of the pool's last few epochs.
func (a *EngineActivities) pruneLogs(poolID string, epoch int64) {
	const keep = 4
	for e := epoch - keep; e > 0; e-- {
		if os.Remove(a.logPath(poolID, e)) != nil {
			break // older ones went earlier
		}
	}
}
