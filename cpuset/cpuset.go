// Package cpuset parses CPU lists ("0-3,8") and pins processes to them: a
// node keeps its engines' CPUs to the engines, and its own threads off them.
package cpuset

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Parse reads a CPU list in the kernel's format ("1", "0-3,8").
func Parse(list string) (unix.CPUSet, error) {
	var set unix.CPUSet
	if strings.TrimSpace(list) == "" {
		return set, fmt.Errorf("empty CPU list")
	}
	for _, part := range strings.Split(list, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a || b >= 1024 {
			return set, fmt.Errorf("bad CPU list %q: want e.g. 1 or 0-3,8", list)
		}
		for c := a; c <= b; c++ {
			set.Set(c)
		}
	}
	return set, nil
}

// Format writes a set in the kernel's list format.
func Format(set unix.CPUSet) string {
	var parts []string
	for c := 0; c < 1024; c++ {
		if !set.IsSet(c) {
			continue
		}
		end := c
		for end+1 < 1024 && set.IsSet(end+1) {
			end++
		}
		if end == c {
			parts = append(parts, strconv.Itoa(c))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", c, end))
		}
		c = end
	}
	return strings.Join(parts, ",")
}

// Split checks engines against the CPUs this process may use and returns
// the rest, for everything that is not an engine.
func Split(engines unix.CPUSet) (rest unix.CPUSet, err error) {
	have, err := Of(0)
	if err != nil {
		return rest, fmt.Errorf("read CPU affinity: %w", err)
	}
	for c := 0; c < 1024; c++ {
		switch {
		case engines.IsSet(c) && !have.IsSet(c):
			return rest, fmt.Errorf("CPU %d is not available to this process (it may use %s)", c, Format(have))
		case have.IsSet(c) && !engines.IsSet(c):
			rest.Set(c)
		}
	}
	if rest.Count() == 0 {
		return rest, fmt.Errorf("engines would take every CPU (%s): leave at least one for the node agent", Format(have))
	}
	return rest, nil
}

// Reserve leaves the CPUs in engines to the engines: every thread of this
// process moves to the other CPUs it may use, which it returns.
func Reserve(engines unix.CPUSet) (rest unix.CPUSet, err error) {
	if rest, err = Split(engines); err != nil {
		return rest, err
	}
	return rest, PinProcess(0, rest)
}

// PinProcess sets the affinity of every thread of process pid (0: this
// one); threads started later inherit it from the thread that starts them.
func PinProcess(pid int, set unix.CPUSet) error {
	if pid == 0 {
		pid = os.Getpid()
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
			return fmt.Errorf("pin thread %d to CPUs %s: %w", tid, Format(set), err)
		}
	}
	return nil
}

// Of reads the CPUs process pid may run on.
func Of(pid int) (unix.CPUSet, error) {
	var set unix.CPUSet
	err := unix.SchedGetaffinity(pid, &set)
	return set, err
}

// Last is the highest CPU in set, -1 when it is empty.
func Last(set unix.CPUSet) int {
	for c := 1023; c >= 0; c-- {
		if set.IsSet(c) {
			return c
		}
	}
	return -1
}
