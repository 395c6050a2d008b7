package activities

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/llorch/llorch/pool"
)

// Environment variables that mark an engine process as a node's and a
// pool's, so fencing and adoption recognise it from /proc/<pid>/environ
// without trusting a bare pid.
const (
	EnvNodeID    = "LLORCH_ENGINE_NODE"
	EnvPoolID    = "LLORCH_POOL_ID"
	EnvPoolEpoch = "LLORCH_POOL_EPOCH"
)

// engineProc is an engine this worker runs: one it started (cmd set) or one
// it adopted from an earlier worker (cmd nil; its exit is seen through
// /proc, its exit code is unknown). done closes once it has exited;
// exitCode and exitedAt are set before.
type engineProc struct {
	poolID   string
	epoch    int64
	pid      int
	url      string
	logPath  string
	started  time.Time
	cmd      *exec.Cmd
	adopted  bool
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

type procKey struct {
	pool  string
	epoch int64
}

// register records p as the engine of its pool at its epoch.
func (a *EngineActivities) register(p *engineProc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.procs == nil {
		a.procs = map[procKey]*engineProc{}
	}
	a.procs[procKey{p.poolID, p.epoch}] = p
}

// lookup is the engine of pool at epoch (and pid, when given) this worker runs.
func (a *EngineActivities) lookup(poolID string, epoch int64, pid int) *engineProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.procs[procKey{poolID, epoch}]
	if p == nil || (pid != 0 && p.pid != pid) {
		return nil
	}
	return p
}

// forget drops p from the table if it is still there.
func (a *EngineActivities) forget(p *engineProc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	k := procKey{p.poolID, p.epoch}
	if a.procs[k] == p {
		delete(a.procs, k)
	}
}

// LiveEngine is an engine process of this node found in /proc.
type LiveEngine struct {
	PoolID string
	Epoch  int64
	PID    int
}

// LiveEngines lists the engine processes of a's node, whoever started
// them: those carry EnvNodeID=<node> in their environment. (Functions, not
// methods: every method of EngineActivities is an activity.)
func LiveEngines(a *EngineActivities) []LiveEngine { return a.liveEngines() }

func (a *EngineActivities) liveEngines() []LiveEngine {
	return scanEngines(func(env map[string]string) bool { return env[EnvNodeID] == a.NodeID })
}

// PoolEngines lists the engine processes of a pool on this machine, of
// whichever node.
func PoolEngines(poolID string) []LiveEngine {
	return scanEngines(func(env map[string]string) bool { return env[EnvPoolID] == poolID })
}

// scanEngines lists the live engine processes whose markers keep accepts.
func scanEngines(keep func(env map[string]string) bool) []LiveEngine {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []LiveEngine
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, ok := engineEnvOf(pid)
		if !ok || !keep(env) {
			continue
		}
		epoch, _ := strconv.ParseInt(env[EnvPoolEpoch], 10, 64)
		out = append(out, LiveEngine{PoolID: env[EnvPoolID], Epoch: epoch, PID: pid})
	}
	return out
}

// engineEnvOf reads the llorch markers of a live (not zombie) process.
func engineEnvOf(pid int) (map[string]string, bool) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, false
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return nil, false
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil, false
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(raw, []byte{0}) {
		k, v, ok := bytes.Cut(kv, []byte{'='})
		if !ok {
			continue
		}
		switch string(k) {
		case EnvNodeID, EnvPoolID, EnvPoolEpoch:
			env[string(k)] = string(v)
		}
	}
	return env, env[EnvPoolID] != ""
}

// isEngine says whether pid is a live engine of this node's pool at epoch
// (any epoch when epoch is 0): a reused pid is never mistaken for one.
func (a *EngineActivities) isEngine(pid int, poolID string, epoch int64) bool {
	env, ok := engineEnvOf(pid)
	if !ok || env[EnvNodeID] != a.NodeID || env[EnvPoolID] != poolID {
		return false
	}
	return epoch == 0 || env[EnvPoolEpoch] == strconv.FormatInt(epoch, 10)
}

// Adopt makes a take over an engine an earlier worker of its node started,
// as recorded in its handoff: it must still run, as that pool's engine at
// that epoch. Supervise then watches it like one of its own.
func Adopt(a *EngineActivities, h pool.Handoff) error { return a.adopt(h) }

func (a *EngineActivities) adopt(h pool.Handoff) error {
	if !a.isEngine(h.PID, h.PoolID, h.Epoch) {
		return fmt.Errorf("pool %s: no live engine of epoch %d with pid %d", h.PoolID, h.Epoch, h.PID)
	}
	if p := a.lookup(h.PoolID, h.Epoch, h.PID); p != nil {
		return nil // already ours
	}
	p := &engineProc{poolID: h.PoolID, epoch: h.Epoch, pid: h.PID, url: h.URL, adopted: true,
		logPath: a.logPath(h.PoolID, h.Epoch), started: h.StartedAt, done: make(chan struct{})}
	a.register(p)
	go func() {
		// Not our child: poll /proc for its end.
		for a.isEngine(p.pid, p.poolID, p.epoch) {
			time.Sleep(200 * time.Millisecond)
		}
		p.exitCode, p.exitedAt = -1, time.Now()
		close(p.done)
		a.log().Info("adopted engine exited", "pool", p.poolID, "epoch", p.epoch, "pid", p.pid)
	}()
	a.log().Info("adopted engine of an earlier worker", "pool", h.PoolID, "epoch", h.Epoch, "pid", h.PID, "url", h.URL)
	return nil
}

// stopPool stops every engine of the pool whose epoch stop accepts (nil:
// all): those in the table and any other process of this node marked as
// the pool's (an earlier worker's). The handoff file goes with the engine
// it describes; lease files of stopped epochs are removed.
func (a *EngineActivities) stopPool(poolID string, stop func(epoch int64) bool) {
	if stop == nil {
		stop = func(int64) bool { return true }
	}
	a.mu.Lock()
	var mine []*engineProc
	for k, p := range a.procs {
		if k.pool == poolID && stop(k.epoch) {
			mine = append(mine, p)
		}
	}
	a.mu.Unlock()
	for _, p := range mine {
		a.kill(p)
		a.forget(p)
		os.Remove(a.leasePath(poolID, p.epoch))
	}
	for _, e := range a.liveEngines() {
		if e.PoolID == poolID && stop(e.Epoch) {
			a.killForeign(e)
			os.Remove(a.leasePath(poolID, e.Epoch))
		}
	}
	var h pool.Handoff
	hpath := pool.HandoffPath(a.RuntimeDir, poolID)
	if err := readJSON(hpath, &h); err != nil || stop(h.Epoch) {
		os.Remove(hpath) // stopped, or unreadable and so stale
	}
}

// kill stops an engine: SIGTERM to its process group, engineStopGrace, then
// SIGKILL; it returns once it is seen to exit.
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

// killForeign stops an engine process this worker does not hold (fencing).
func (a *EngineActivities) killForeign(e LiveEngine) {
	a.log().Info("fencing engine", "pool", e.PoolID, "epoch", e.Epoch, "pid", e.PID)
	signal := func(sig syscall.Signal) {
		_ = syscall.Kill(-e.PID, sig) // engines lead their own process group
		_ = syscall.Kill(e.PID, sig)
	}
	signal(syscall.SIGTERM)
	if a.waitGone(e, engineStopGrace) {
		return
	}
	signal(syscall.SIGKILL)
	a.waitGone(e, engineStopGrace)
}

func (a *EngineActivities) waitGone(e LiveEngine, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !a.isEngine(e.PID, e.PoolID, e.Epoch) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !a.isEngine(e.PID, e.PoolID, e.Epoch)
}

func (a *EngineActivities) enginesDir() string { return filepath.Join(a.RuntimeDir, "engines") }

func (a *EngineActivities) enginePath(poolID string, epoch int64, ext string) string {
	return filepath.Join(a.enginesDir(), fmt.Sprintf("%s@%d.%s", poolID, epoch, ext))
}
func (a *EngineActivities) logPath(poolID string, epoch int64) string {
	return a.enginePath(poolID, epoch, "log")
}
func (a *EngineActivities) leasePath(poolID string, epoch int64) string {
	return a.enginePath(poolID, epoch, "lease")
}

// Fence stops a's engines of poolID at epoch (and the handoff, if it names
// that epoch): the pool does not own them.
func Fence(a *EngineActivities, poolID string, epoch int64) {
	a.stopPool(poolID, func(e int64) bool { return e == epoch })
}
