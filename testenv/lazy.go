package testenv

import (
	"os"
	"strconv"
	"syscall"
)

// Start starts the services for a caller that cannot start them from
// TestMain: a fuzz target starts them on its first input, so only the
// processes that run inputs (the fuzzing engine's workers, or the one
// process of a plain `go test`) pay for them, never the coordinator.
// Stop them with Stop.
func Start() (*Env, error) {
	closeInheritedOnExec()
	return start()
}

// Stop stops the services Start started.
func (e *Env) Stop() { e.stop() }

// closeInheritedOnExec marks every descriptor this process inherited
// (beyond stdin, stdout, stderr) close-on-exec. A fuzzing worker inherits
// the pipes it talks to its coordinator over; without this, the Temporal
// server it starts would hold them open after the worker ends, and the
// coordinator would wait on them forever (seen: a campaign hung at "execs:
// 1178 (0/sec)" for 15 minutes, its worker gone, its Temporal still up).
// Descriptors Go opens are close-on-exec already.
func closeInheritedOnExec() {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}
