package engines

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/cpuset"
	"github.com/llorch/llorch/engine/lease"
	"github.com/llorch/llorch/pool"
)

// Kind is the engine a pool runs: the built-in one unless it names another.
func Kind(e pool.Engine) pool.Engine {
	if e == "" {
		return pool.Builtin
	}
	return e
}

// Spawn starts the engine of spec at epoch on a free port, logging to
// engines/<pool>@<epoch>.log, and holds it. It does not wait for the engine
// to load. A configuration it cannot start is a non-retryable
// pool.ErrEngineStart.
func (t *Table) Spawn(spec pool.Spec, modelPath string, epoch int64) (*Proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("node %s: pick a port: %w", t.NodeID, err)
	}
	threads := t.Threads
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
	if spec.Embeddings {
		common = append(common, "--embeddings", "--pooling", "mean")
	}
	var bin string
	var args []string
	detached := false
	switch Kind(spec.Engine) {
	case pool.Builtin:
		if t.LlorchBin == "" {
			return nil, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("node %s: the llorch binary is not configured", t.NodeID), pool.ErrEngineStart, nil)
		}
		bin = t.LlorchBin
		args = append([]string{"engine"}, common...)
		if t.LibDir != "" {
			args = append(args, "--lib-dir", t.LibDir)
		}
		// It outlives a worker restart (the new worker adopts it), not a
		// worker that stays away.
		leasePath := t.leasePath(spec.PoolID, epoch)
		if err := lease.Touch(leasePath); err != nil {
			return nil, fmt.Errorf("node %s: engine lease: %w", t.NodeID, err)
		}
		args = append(args, "--supervisor-lease", leasePath, "--supervisor-timeout", t.orphanTimeout().String())
		detached = true
	case pool.LlamaServer:
		if t.LlamaServerBin == "" {
			return nil, temporal.NewNonRetryableApplicationError(
				fmt.Sprintf("llama-server is not installed on node %s", t.NodeID), pool.ErrEngineStart, nil)
		}
		bin = t.LlamaServerBin
		args = append(common, "-ngl", strconv.Itoa(spec.NGPULayers), "--metrics", "--no-webui")
	default:
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: unknown engine %q", t.NodeID, spec.PoolID, spec.Engine), pool.ErrEngineStart, nil)
	}

	logf, err := os.OpenFile(t.logPath(spec.PoolID, epoch), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("node %s: engine log: %w", t.NodeID, err)
	}
	defer logf.Close()

	cmd := exec.Command(bin, args...)
	cmd.Env = engineEnv(os.Environ(), t.NodeID, spec.DeviceMask, spec.PoolID, epoch)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Built-in engines run in their own session and end by their lease;
	// llama-server cannot watch one, so it dies with its worker.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if detached {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := startLocked(cmd, t.CPUs); err != nil {
		return nil, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: pool %s: start %s: %v", t.NodeID, spec.PoolID, bin, err), pool.ErrEngineStart, err)
	}
	p := &Proc{
		PoolID:  spec.PoolID,
		Epoch:   epoch,
		PID:     cmd.Process.Pid,
		URL:     "http://127.0.0.1:" + strconv.Itoa(port),
		Started: time.Now().UTC(),
		done:    make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		p.exitCode = exitCode(cmd.ProcessState)
		p.exitedAt = time.Now()
		close(p.done)
		t.Logger().Info("engine exited", "pool", p.PoolID, "epoch", p.Epoch, "pid", p.PID, "code", p.exitCode)
	}()
	t.register(p)
	t.Logger().Info("engine started", "pool", spec.PoolID, "epoch", epoch, "pid", p.PID, "url", p.URL, "bin", bin)
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
		go spawner()
	})
	r := spawnReq{cmd: cmd, cpus: cpus, err: make(chan error, 1)}
	spawnCh <- r
	return <-r.err
}

// spawner serves spawnCh from a thread of its own, never unlocked: the
// thread lives as long as the worker. It is never the main thread, whose
// affinity is the process's as others see it (sched_getaffinity(pid)): the
// engines' CPUs there would pin the worker to them too.
func spawner() {
	runtime.LockOSThread()
	if unix.Gettid() == os.Getpid() {
		// Hold the main thread, so the spawner cannot land on it, and
		// start it again on another.
		go spawner()
		select {}
	}
	for r := range spawnCh {
		if r.cpus != nil {
			if err := unix.SchedSetaffinity(0, r.cpus); err != nil {
				r.err <- fmt.Errorf("pin to CPUs %s: %w", cpuset.Format(*r.cpus), err)
				continue
			}
		}
		r.err <- r.cmd.Start()
	}
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

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
