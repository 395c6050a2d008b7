package bench

import (
	"cmp"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// profileDir, when set (LLORCH_BENCH_PROFILE), receives a CPU profile of
// the apiserver for the benchmarks that take one; `just bench-profile`
// sets it.
var profileDir = os.Getenv("LLORCH_BENCH_PROFILE")

// cpuProfile fetches a CPU profile of the apiserver over the next seconds
// into profileDir/name.pprof; wait blocks until it is written.
func (c *benchCluster) cpuProfile(b *testing.B, name string, seconds int) (wait func()) {
	return cpuProfileOf(b, c.pprof, name, seconds)
}

// cpuProfileOf is cpuProfile of the process serving pprof at addr.
func cpuProfileOf(b *testing.B, addr, name string, seconds int) (wait func()) {
	if profileDir == "" || addr == "" {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		res, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, seconds))
		if err != nil {
			b.Logf("profile %s: %v", name, err)
			return
		}
		defer res.Body.Close()
		_ = os.MkdirAll(profileDir, 0o755)
		path := filepath.Join(profileDir, name+".pprof")
		f, err := os.Create(path)
		if err == nil {
			_, err = io.Copy(f, res.Body)
			f.Close()
		}
		if err != nil {
			b.Logf("profile %s: %v", name, err)
			return
		}
		b.Logf("CPU profile: %s (go tool pprof -top %s)", path, path)
	}()
	return func() { <-done }
}

// cpuTicks is CPU time (user+system, in clock ticks) by role of process.
type cpuTicks map[string]map[int]uint64

// cpuSnapshot reads the CPU time of this benchmark's processes: the
// apiserver, node workers and engines of the cluster under home, the
// Temporal and S3 servers, and this process (the load generator).
func cpuSnapshot(home string) cpuTicks {
	out := cpuTicks{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		role := ""
		switch {
		case pid == os.Getpid():
			role = "load generator (bench)"
		case strings.Contains(string(raw), "start-dev"):
			role = "temporal server"
		case strings.HasSuffix(args[0], "versitygw"):
			role = "s3 (versitygw)"
		case !strings.Contains(string(raw), home) || len(args) < 2:
		case args[1] == "apiserver":
			role = "apiserver"
		case args[1] == "worker":
			role = "node workers"
		case args[1] == "engine":
			role = "engines"
		}
		if role == "" {
			continue
		}
		if t, ok := procTicks(pid); ok {
			if out[role] == nil {
				out[role] = map[int]uint64{}
			}
			out[role][pid] = t
		}
	}
	return out
}

func procTicks(pid int) (uint64, bool) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(raw)
	// Fields after the command name, which may hold spaces: state is the
	// 3rd field, utime the 14th and stime the 15th.
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0, false
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return u + st, true
}

// cpuSeconds is the CPU time each role used between two snapshots.
func cpuSeconds(before, after cpuTicks) map[string]float64 {
	out := map[string]float64{}
	for role, pids := range after {
		var ticks uint64
		for pid, t := range pids {
			ticks += t - min(t, before[role][pid])
		}
		out[role] = float64(ticks) / 100 // clock ticks are 1/100 s on Linux
	}
	return out
}

// cpuShare is CPU seconds as a share of all the machine's CPUs over wall.
func cpuShare(secs map[string]float64, wall time.Duration) map[string]float64 {
	share := map[string]float64{}
	for role, s := range secs {
		share[role] = s / (wall.Seconds() * float64(runtime.NumCPU()))
	}
	return share
}

// cpuTable renders shares as "role 41%, ..." by decreasing share.
func cpuTable(share map[string]float64) string {
	type kv struct {
		k string
		v float64
	}
	var all []kv
	total := 0.0
	for k, v := range share {
		all = append(all, kv{k, v})
		total += v
	}
	slices.SortFunc(all, func(a, b kv) int { return cmp.Compare(b.v, a.v) })
	parts := make([]string, 0, len(all)+1)
	for _, e := range all {
		parts = append(parts, fmt.Sprintf("%s %.0f%%", e.k, 100*e.v))
	}
	parts = append(parts, fmt.Sprintf("(all %.0f%% of %d CPUs)", 100*total, runtime.NumCPU()))
	return strings.Join(parts, ", ")
}
