package devcluster

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// syncWriter serialises whole lines from several children onto one writer,
// so lines never interleave mid-way.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) line(tag, text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(s.w, "%-12s%s\n", "["+tag+"]", text)
}

func (s *syncWriter) printf(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(s.w, format, args...)
}

// tail keeps the last lines of a child's output for error messages: "the
// worker exited with status 1" is useless without the worker's last words.
type tail struct {
	mu    sync.Mutex
	lines []string
	max   int
}

func (t *tail) add(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, s)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return "(no output)"
	}
	return "\n    " + strings.Join(t.lines, "\n    ")
}

// spawner starts every child from one OS thread that stays alive, locked,
// until the supervisor is done. PR_SET_PDEATHSIG fires when the *thread*
// that forked the child exits, not the process, and the Go runtime may end a
// thread under us (golang/go#27505); starting from a pinned thread makes the
// signal mean exactly "llorch dev is gone".
type spawner struct {
	reqs chan spawnReq
	quit chan struct{}
	once sync.Once
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), quit: make(chan struct{})}
	go func() {
		// Never unlocked: when this goroutine returns the runtime ends the
		// thread, and any child somehow still alive gets its SIGKILL.
		runtime.LockOSThread()
		for {
			select {
			case r := <-s.reqs:
				r.errc <- r.cmd.Start()
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case s.reqs <- spawnReq{cmd, errc}:
		return <-errc
	case <-s.quit:
		return errors.New("supervisor is shutting down")
	}
}

func (s *spawner) close() { s.once.Do(func() { close(s.quit) }) }

// child is one supervised process.
type child struct {
	tag   string
	cmd   *exec.Cmd
	tail  *tail
	done  chan struct{} // closed once the process is reaped and its output drained
	err   error         // from cmd.Wait; valid after done
	since time.Time
	// stopping is set before we signal it, so an exit we caused is not
	// reported as a crash.
	mu       sync.Mutex
	stopping bool
	killed   bool
	gone     bool // exited; its group swept; pid about to be reaped
}

// startChild starts bin with args, its stdout and stderr merged into one pipe
// whose lines go to out prefixed with [tag]. One pipe for both keeps the
// child's own order of lines, which two pipes would lose.
func startChild(sp *spawner, out *syncWriter, tag, bin string, args, env []string) (*child, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdin = nil // /dev/null: a child in another process group must not read the terminal
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: the terminal's SIGINT goes to the foreground
		// group only, so Ctrl-C reaches llorch dev and not the children,
		// which llorch dev then stops in order. It also lets us signal a
		// child together with anything it forked.
		Setpgid: true,
		// Die with llorch dev, even when it is SIGKILLed and cannot clean up.
		Pdeathsig: syscall.SIGKILL,
	}
	c := &child{tag: tag, cmd: cmd, tail: &tail{max: 40}, done: make(chan struct{})}
	err = sp.start(cmd)
	w.Close() // the child holds its own copy; ours would keep the pipe open forever
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("start %s (%s): %w", tag, bin, err)
	}
	c.since = time.Now()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		defer r.Close()
		br := bufio.NewReaderSize(r, 64<<10)
		for {
			// ReadSlice bounds memory: an over-long line comes out in pieces.
			b, err := br.ReadSlice('\n')
			if len(b) > 0 {
				s := strings.TrimRight(string(b), "\r\n")
				c.tail.add(s)
				out.line(tag, s)
			}
			if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
				return
			}
		}
	}()
	go func() {
		pid := cmd.Process.Pid
		// Wait for the exit without reaping it: while the child is a zombie
		// its pid, and so its process group id, cannot be reused, so the
		// signals below cannot reach a stranger.
		waitExitNoReap(pid)
		c.mu.Lock()
		c.gone = true
		c.mu.Unlock()
		// Sweep the child's group: whatever it started and left behind
		// (llama-server engines of a worker, say) goes with it. ESRCH, an
		// empty group, is the normal case.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		c.err = cmd.Wait()
		// The pipe closes when the last holder exits; a grandchild that kept
		// it would block us forever, so wait for the drain only briefly.
		select {
		case <-drained:
		case <-time.After(2 * time.Second):
		}
		close(c.done)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// signal sends sig to the child's whole process group, unless the child
// has exited (its group was swept then, and its pid may be reused once
// reaped).
func (c *child) signal(sig syscall.Signal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gone {
		return
	}
	_ = syscall.Kill(-c.pid(), sig)
}

// waitExitNoReap blocks until pid has exited, leaving it a zombie for
// cmd.Wait to reap.
func waitExitNoReap(pid int) {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return
		}
	}
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs and waits for good.
// It returns an error when the child did not stop cleanly.
func (c *child) stop(grace time.Duration) error {
	c.mu.Lock()
	already := c.stopping
	c.stopping = true
	c.mu.Unlock()
	if !already && !c.exited() {
		c.signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(grace):
			c.mu.Lock()
			c.killed = true
			c.mu.Unlock()
			c.signal(syscall.SIGKILL)
			<-c.done
		}
	}
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.killed {
		return fmt.Errorf("%s did not stop within %s of SIGTERM and was killed", c.tag, grace)
	}
	if !cleanExit(c.err) {
		return fmt.Errorf("%s stopped with %s; last output:%s", c.tag, describeExit(c.err), c.tail)
	}
	return nil
}

// cleanExit accepts exit 0 and the ways a program ends on SIGTERM: killed by
// the signal itself (versitygw does not catch it), or exit 128+15.
func cleanExit(err error) bool {
	if err == nil {
		return true
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok {
		return false
	}
	if ws.Signaled() {
		return ws.Signal() == syscall.SIGTERM || ws.Signal() == syscall.SIGINT
	}
	return ws.ExitStatus() == 128+int(syscall.SIGTERM) || ws.ExitStatus() == 128+int(syscall.SIGINT)
}

func describeExit(err error) string {
	if err == nil {
		return "exit status 0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "signal " + ws.Signal().String()
		}
		return fmt.Sprintf("exit status %d", ee.ExitCode())
	}
	return err.Error()
}
