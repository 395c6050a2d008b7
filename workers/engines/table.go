package engines

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/engine/lease"
	"github.com/llorch/llorch/pool"
)

// stopGrace is how long an engine has after SIGTERM, then after SIGKILL.
const stopGrace = 5 * time.Second

// logTailLines is how much of an engine's log its failures quote.
const logTailLines = 20

// Table holds the engines a node's worker runs. Use it by pointer.
type Table struct {
	NodeID string
	// RuntimeDir holds engines/<pool>.json (the handoff of the serving
	// engine) and per epoch engines/<pool>@<epoch>.log and .lease.
	RuntimeDir     string
	LlorchBin      string // the builtin engine is `LlorchBin engine ...`
	LlamaServerBin string // "" = llama-server is not installed
	LibDir         string // --lib-dir of the builtin engine
	Threads        int    // -t; 0 = 1
	// OrphanTimeout: how long a built-in engine outlives its supervisor (a
	// dead worker) before it exits; a worker back within it adopts the
	// engine. 0 = one minute.
	OrphanTimeout time.Duration
	// CPUs the engines run on (nil: any); the worker keeps off them.
	CPUs *unix.CPUSet
	Log  *slog.Logger

	mu    sync.Mutex
	procs map[procKey]*Proc
}

// Proc is an engine the table holds: one it started, or one it adopted from
// an earlier worker (its exit is seen through /proc, its exit code is
// unknown). Done closes once it has exited.
type Proc struct {
	PoolID  string
	Epoch   int64
	PID     int
	URL     string
	Started time.Time

	done     chan struct{}
	exitCode int // set before done closes, as exitedAt
	exitedAt time.Time
}

// Done closes once the engine has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited says whether the engine has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ExitCode is the engine's exit code once it has exited: 128+signal for a
// signal, -1 when unknown (an adopted engine).
func (p *Proc) ExitCode() int { return p.exitCode }

// ExitedAt is when the engine was seen to exit.
func (p *Proc) ExitedAt() time.Time { return p.exitedAt }

// ExitReason says how the engine exited.
func (p *Proc) ExitReason() string {
	r := fmt.Sprintf("engine exited with code %d", p.exitCode)
	if p.exitCode > 128 {
		r += fmt.Sprintf(" (signal %s)", syscall.Signal(p.exitCode-128))
	}
	return r
}

type procKey struct {
	pool  string
	epoch int64
}

// Logger is the log of the node's engines: Log, else slog's default.
func (t *Table) Logger() *slog.Logger {
	if t.Log == nil {
		return slog.Default()
	}
	return t.Log
}

// register records p as the engine of its pool at its epoch.
func (t *Table) register(p *Proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.procs == nil {
		t.procs = map[procKey]*Proc{}
	}
	t.procs[procKey{p.PoolID, p.Epoch}] = p
}

// Lookup is the engine of pool at epoch (and pid, when given) the table
// holds, or nil.
func (t *Table) Lookup(poolID string, epoch int64, pid int) *Proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.procs[procKey{poolID, epoch}]
	if p == nil || (pid != 0 && p.PID != pid) {
		return nil
	}
	return p
}

// forget drops p from the table if it is still there.
func (t *Table) forget(p *Proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := procKey{p.PoolID, p.Epoch}
	if t.procs[k] == p {
		delete(t.procs, k)
	}
}

// Adopt takes over an engine an earlier worker of the node started, as
// recorded in its handoff: it must still run, as that pool's engine at that
// epoch. It is then held like one the table started.
func (t *Table) Adopt(h pool.Handoff) error {
	if !t.isEngine(h.PID, h.PoolID, h.Epoch) {
		return fmt.Errorf("pool %s: no live engine of epoch %d with pid %d", h.PoolID, h.Epoch, h.PID)
	}
	if p := t.Lookup(h.PoolID, h.Epoch, h.PID); p != nil {
		return nil // already ours
	}
	p := &Proc{PoolID: h.PoolID, Epoch: h.Epoch, PID: h.PID, URL: h.URL, Started: h.StartedAt, done: make(chan struct{})}
	t.register(p)
	go func() {
		// Not our child: poll /proc for its end.
		for t.isEngine(p.PID, p.PoolID, p.Epoch) {
			time.Sleep(200 * time.Millisecond)
		}
		p.exitCode, p.exitedAt = -1, time.Now()
		close(p.done)
		t.Logger().Info("adopted engine exited", "pool", p.PoolID, "epoch", p.Epoch, "pid", p.PID)
	}()
	t.Logger().Info("adopted engine of an earlier worker", "pool", h.PoolID, "epoch", h.Epoch, "pid", h.PID, "url", h.URL)
	return nil
}

// StopPool stops every engine of the pool whose epoch stop accepts (nil:
// all): those in the table and any other process of this node marked as
// the pool's (an earlier worker's). The handoff file goes with the engine
// it describes; lease files of stopped epochs are removed.
func (t *Table) StopPool(poolID string, stop func(epoch int64) bool) {
	if stop == nil {
		stop = func(int64) bool { return true }
	}
	t.mu.Lock()
	var mine []*Proc
	for k, p := range t.procs {
		if k.pool == poolID && stop(k.epoch) {
			mine = append(mine, p)
		}
	}
	t.mu.Unlock()
	for _, p := range mine {
		t.Kill(p)
		os.Remove(t.leasePath(poolID, p.Epoch))
	}
	for _, e := range t.Live() {
		if e.PoolID == poolID && stop(e.Epoch) {
			t.killForeign(e)
			os.Remove(t.leasePath(poolID, e.Epoch))
		}
	}
	hpath := pool.HandoffPath(t.RuntimeDir, poolID)
	if h, err := ReadHandoff(hpath); err != nil || stop(h.Epoch) {
		os.Remove(hpath) // stopped, or unreadable and so stale
	}
}

// StopEpoch stops the pool's engines of that epoch (and the handoff, if it
// names that epoch): fencing one the pool does not own, or stopping one it
// is done with.
func (t *Table) StopEpoch(poolID string, epoch int64) {
	t.StopPool(poolID, func(e int64) bool { return e == epoch })
}

// Kill stops an engine and drops it from the table: SIGTERM to its process
// group, stopGrace, then SIGKILL; it returns once it is seen to exit.
func (t *Table) Kill(p *Proc) {
	t.kill(p)
	t.forget(p)
}

func (t *Table) kill(p *Proc) {
	if p.Exited() {
		return
	}
	_ = syscall.Kill(-p.PID, syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(stopGrace):
	}
	t.Logger().Warn("engine ignored SIGTERM; killing", "pool", p.PoolID, "pid", p.PID)
	_ = syscall.Kill(-p.PID, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		t.Logger().Error("engine did not exit after SIGKILL", "pool", p.PoolID, "pid", p.PID)
	}
}

// killForeign stops an engine process the table does not hold (fencing).
func (t *Table) killForeign(e Live) {
	t.Logger().Info("fencing engine", "pool", e.PoolID, "epoch", e.Epoch, "pid", e.PID)
	signal := func(sig syscall.Signal) {
		_ = syscall.Kill(-e.PID, sig) // engines lead their own process group
		_ = syscall.Kill(e.PID, sig)
	}
	signal(syscall.SIGTERM)
	if t.waitGone(e, stopGrace) {
		return
	}
	signal(syscall.SIGKILL)
	t.waitGone(e, stopGrace)
}

func (t *Table) waitGone(e Live, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !t.isEngine(e.PID, e.PoolID, e.Epoch) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !t.isEngine(e.PID, e.PoolID, e.Epoch)
}

// Dir holds the handoff files, logs and leases of the node's engines.
func (t *Table) Dir() string { return filepath.Join(t.RuntimeDir, "engines") }

func (t *Table) enginePath(poolID string, epoch int64, ext string) string {
	return filepath.Join(t.Dir(), fmt.Sprintf("%s@%d.%s", poolID, epoch, ext))
}
func (t *Table) logPath(poolID string, epoch int64) string {
	return t.enginePath(poolID, epoch, "log")
}
func (t *Table) leasePath(poolID string, epoch int64) string {
	return t.enginePath(poolID, epoch, "lease")
}

// RenewLease touches the supervisor lease of the pool's engine at epoch:
// a built-in engine exits once it lapses.
func (t *Table) RenewLease(poolID string, epoch int64) error {
	return lease.Touch(t.leasePath(poolID, epoch))
}

func (t *Table) orphanTimeout() time.Duration {
	if t.OrphanTimeout <= 0 {
		return time.Minute
	}
	return t.OrphanTimeout
}

// LogTail is the end of the log of the pool's engine at epoch.
func (t *Table) LogTail(poolID string, epoch int64) string {
	f, err := os.Open(t.logPath(poolID, epoch))
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
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	return strings.Join(lines, "\n")
}

// PruneLogs keeps the logs of the pool's last few epochs up to epoch.
func (t *Table) PruneLogs(poolID string, epoch int64) {
	const keep = 4
	for e := epoch - keep; e > 0; e-- {
		if os.Remove(t.logPath(poolID, e)) != nil {
			break // older ones went earlier
		}
	}
}

// WriteHandoff writes the pool's handoff file: on a reload, writing it is
// the switch to the new engine.
func (t *Table) WriteHandoff(h pool.Handoff) error {
	return writeJSONAtomic(pool.HandoffPath(t.RuntimeDir, h.PoolID), h)
}

// ReadHandoff reads a handoff file.
func ReadHandoff(path string) (pool.Handoff, error) {
	var h pool.Handoff
	b, err := os.ReadFile(path)
	if err != nil {
		return h, err
	}
	return h, json.Unmarshal(b, &h)
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
