package bench

import (
	"bufio"
	"cmp"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

var idleNodes = flag.String("idle-nodes", "0,100,1000", "node counts of BenchmarkControlPlaneIdle (the first should be 0: the baseline)")

const (
	idleStartRate = 50               // the simulator's --start-rate
	idleSettle    = 10 * time.Second // after the nodes are Online, before measuring
	idleWindow    = 20 * time.Second // what is measured
	// heartbeatsWindow measures Temporal with the apiserver stopped.
	heartbeatsWindow = 10 * time.Second
	// idleOnlineSlack bounds the wait for every node Online beyond the
	// start itself (count / idleStartRate): a cluster that cannot hold them
	// is measured as it is.
	idleOnlineSlack = time.Minute
)

// idleRun is one size of BenchmarkControlPlaneIdle.
type idleRun struct {
	nodes                              int
	cores                              map[string]float64 // by role, over the window
	machine                            float64            // busy cores of the whole machine over the window
	online, offline, registering, left int                // at the end of the window; left after the simulator stopped
	onlineBefore, minOnline            int                // when the window began; the fewest during it
	toOnline, stopTook                 time.Duration
	beatsPerSec                        float64            // liveness beats the simulator sent, over the window
	calls                              map[string]float64 // Temporal frontend requests per second, by operation
	heartbeatsOnly                     float64            // Temporal's cores with the apiserver stopped
}

// rates renders requests per second by operation, busiest first.
func rates(calls map[string]float64) string {
	ops := make([]string, 0, len(calls))
	for op := range calls {
		ops = append(ops, op)
	}
	slices.SortFunc(ops, func(a, b string) int { return cmp.Compare(calls[b], calls[a]) })
	parts := make([]string, len(ops))
	for i, op := range ops {
		parts[i] = fmt.Sprintf("%s %.1f", op, calls[op])
	}
	return strings.Join(parts, ", ")
}

func (r idleRun) controlPlane() float64 { return r.cores["apiserver"] + r.cores["temporal server"] }

// viewEvery is how often the apiserver's cluster view is read whole: its
// refresh describes every node once, and nothing else describes them here.
func (r idleRun) viewEvery() time.Duration {
	if d := r.calls["DescribeWorkflowExecution"]; r.nodes > 0 && d > 0 {
		return time.Duration(float64(r.nodes) / d * float64(time.Second))
	}
	return 0
}

// BenchmarkControlPlaneIdle: what the control plane (apiserver + Temporal
// server) costs per idle node. For each size, a fresh Temporal dev server
// (in-memory, as the tests use) and apiserver, then `llorch sim nodes` in
// its own process with that many nodes heartbeating every second; once they
// are Online (or the bound passed), 10 s to settle, then the CPU of each
// process over a 20 s window, the nodes Online during it and at its end,
// the Temporal frontend's requests by operation, and the marginal cost per
// node over the 0-node run of the same invocation; then 10 s more with the
// apiserver stopped, which leaves Temporal the heartbeats alone. Fresh servers,
// not one server with the previous size's nodes deregistered: the
// apiserver's cluster view reads every node workflow the namespace still
// lists, Left ones included, so they would bill the next size.
// `just bench` runs it once (-benchtime 1x).
func BenchmarkControlPlaneIdle(b *testing.B) {
	var sizes []int
	for _, f := range strings.Split(*idleNodes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		require.NoError(b, err, "-idle-nodes %q", *idleNodes)
		sizes = append(sizes, n)
	}
	var runs []idleRun
	for _, n := range sizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			var r idleRun
			for range b.N {
				r = controlPlaneIdle(b, n)
			}
			runs = append(runs, r)
			b.ReportMetric(r.controlPlane(), "control-plane-cores")
			b.ReportMetric(float64(r.online), "online")
		})
	}
	if len(runs) == 0 {
		return
	}
	base, baseBeats, haveBase := 0.0, 0.0, runs[0].nodes == 0
	if haveBase {
		base, baseBeats = runs[0].controlPlane(), runs[0].heartbeatsOnly
	}
	var table strings.Builder
	table.WriteString("\n| nodes | Online at end (fewest in window) | apiserver | Temporal | control plane | per node (ms CPU/s) " +
		"| Temporal, apiserver stopped (per node) | simulator | beats/s | cluster view read every | machine busy | to Online | stop, Left |\n" +
		"|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	res := map[string]any{"window_s": idleWindow.Seconds(), "heartbeat_s": node.DefaultHeartbeatInterval.Seconds(), "cpus": runtime.NumCPU()}
	for _, r := range runs {
		perNode, perNodeBeats := "-", "-"
		k := fmt.Sprintf("n%d_", r.nodes)
		if haveBase && r.nodes > 0 {
			m := 1000 * (r.controlPlane() - base) / float64(r.nodes)
			perNode = fmt.Sprintf("%.2f", m)
			res[k+"marginal_ms_per_s_per_node"] = m
			h := 1000 * (r.heartbeatsOnly - baseBeats) / float64(r.nodes)
			perNodeBeats = fmt.Sprintf("%.2f", h)
			res[k+"heartbeats_only_ms_per_s_per_node"] = h
		}
		fmt.Fprintf(&table, "| %d | %d (%d); Offline %d, Registering %d | %.3f | %.3f | %.3f | %s | %.3f (%s) | %.3f | %.0f | %s | %.2f of %d | %s | %s, %d |\n",
			r.nodes, r.online, r.minOnline, r.offline, r.registering, r.cores["apiserver"], r.cores["temporal server"], r.controlPlane(), perNode,
			r.heartbeatsOnly, perNodeBeats, r.cores["simulator"], r.beatsPerSec, r.viewEvery().Round(10*time.Millisecond),
			r.machine, runtime.NumCPU(), r.toOnline.Round(100*time.Millisecond), r.stopTook.Round(100*time.Millisecond), r.left)
		res[k+"nodes"] = r.nodes
		res[k+"online"] = r.online
		res[k+"online_before_window"] = r.onlineBefore
		res[k+"online_fewest_in_window"] = r.minOnline
		res[k+"offline"] = r.offline
		res[k+"apiserver_cores"] = r.cores["apiserver"]
		res[k+"temporal_cores"] = r.cores["temporal server"]
		res[k+"control_plane_cores"] = r.controlPlane()
		res[k+"simulator_cores"] = r.cores["simulator"]
		res[k+"machine_busy_cores"] = r.machine
		res[k+"beats_per_s"] = r.beatsPerSec
		res[k+"to_online_s"] = r.toOnline.Seconds()
		res[k+"left_after_stop"] = r.left
		res[k+"stop_s"] = r.stopTook.Seconds()
		res[k+"frontend_requests_per_s"] = r.calls
		res[k+"temporal_cores_apiserver_stopped"] = r.heartbeatsOnly
		res[k+"cluster_view_every_s"] = r.viewEvery().Seconds()
	}
	// On stdout: a parent benchmark's own log is not printed beside its sub-benchmarks'.
	fmt.Println(table.String())
	report(b, "control_plane_idle", res)
}

func controlPlaneIdle(b *testing.B, nodes int) idleRun {
	r := idleRun{nodes: nodes}
	home := b.TempDir()
	bin := testenv.Llorch(b)
	temporal := startTemporal(b)
	tc, addr := temporal.client, temporal.addr
	apiPort, err := testenv.FreePort()
	require.NoError(b, err)
	api := fmt.Sprintf("127.0.0.1:%d", apiPort)
	apiOut := &testenv.Buffer{}
	// With LLORCH_BENCH_PROFILE, the apiserver and the simulator serve pprof
	// and their CPU profiles over the window land there.
	apiPprof, simPprof := pprofAddr(b), pprofAddr(b)
	// The nodes serve links as workers do; the apiserver follows them all.
	// (spawn gives each process the link token, benchLinkToken.)
	apiserver := spawn(b, apiOut, bin, "apiserver", "--addr", api, "--temporal-address", addr, "--home", home, "--pprof-addr", apiPprof,
		"--s3-endpoint", env.S3.Endpoint, "--s3-bucket", env.S3.Bucket)
	testenv.Eventually(b, time.Minute, "apiserver healthy", func() (bool, string) {
		res, err := http.Get("http://" + api + "/health")
		if err != nil {
			return false, err.Error() + "\n" + apiOut.String()
		}
		res.Body.Close()
		return res.StatusCode == 200, res.Status
	})
	pids := map[string]int{"apiserver": apiserver.Process.Pid, "temporal server": temporal.pid}

	var simulator *exec.Cmd
	simOut := &testenv.Buffer{}
	metricsPort, err := testenv.FreePort()
	require.NoError(b, err)
	metrics := fmt.Sprintf("127.0.0.1:%d", metricsPort)
	if nodes > 0 {
		began := time.Now()
		simulator = spawn(b, simOut, bin, "sim", "nodes", "--count", strconv.Itoa(nodes), "--temporal-address", addr, "--home", home,
			"--heartbeat-interval", node.DefaultHeartbeatInterval.String(), "--start-rate", strconv.Itoa(idleStartRate), "--metrics-addr", metrics,
			"--pprof-addr", simPprof)
		pids["simulator"] = simulator.Process.Pid
		bound := time.Duration(nodes/idleStartRate)*time.Second + idleOnlineSlack
		for {
			r.onlineBefore = countNodes(b, tc, node.Online)
			if r.onlineBefore == nodes || time.Since(began) > bound {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		r.toOnline = time.Since(began)
		if r.onlineBefore < nodes {
			b.Logf("%d nodes: only %d Online after %s; measuring as it is", nodes, r.onlineBefore, r.toOnline.Round(time.Second))
		}
	}
	time.Sleep(idleSettle)

	r.onlineBefore = countNodes(b, tc, node.Online)
	beats0, calls0 := heartbeatsSent(metrics, simulator != nil), frontendCalls(temporal.metrics)
	profiled := cpuProfileOf(b, apiPprof, fmt.Sprintf("idle-%d-apiserver", nodes), int(idleWindow.Seconds()))
	profiledSim := func() {}
	if simulator != nil {
		profiledSim = cpuProfileOf(b, simPprof, fmt.Sprintf("idle-%d-simulator", nodes), int(idleWindow.Seconds()))
	}
	cpu0, busy0, began := pidTicks(pids), machineTicks(), time.Now()
	// Nodes that miss three beats go Offline and come back: the fewest
	// Online over the window tells that from a steady state.
	r.minOnline = r.onlineBefore
	for time.Since(began) < idleWindow {
		time.Sleep(min(2*time.Second, idleWindow-time.Since(began)))
		if n := countNodes(b, tc, node.Online); n >= 0 {
			r.minOnline = min(r.minOnline, n)
		}
	}
	cpu1, busy1, wall := pidTicks(pids), machineTicks(), time.Since(began)
	beats1, calls1 := heartbeatsSent(metrics, simulator != nil), frontendCalls(temporal.metrics)
	r.calls = map[string]float64{}
	for op, n := range calls1 {
		if d := (n - calls0[op]) / wall.Seconds(); d >= 0.05 {
			r.calls[op] = d
		}
	}
	profiled()
	profiledSim()
	r.cores = map[string]float64{}
	for role, s := range cpuSeconds(cpu0, cpu1) {
		r.cores[role] = s / wall.Seconds()
	}
	r.machine = float64(busy1-busy0) / 100 / wall.Seconds()
	r.beatsPerSec = (beats1 - beats0) / wall.Seconds()
	r.online, r.offline, r.registering = countNodes(b, tc, node.Online), countNodes(b, tc, node.Offline), countNodes(b, tc, node.Registering)
	if r.online < nodes {
		b.Logf("apiserver output (last 2 KiB):\n%s", lastBytes(apiOut.String(), 2048))
	}
	b.Logf("%d nodes: Online %d (at the window's start %d, fewest %d), apiserver %.3f, Temporal %.3f, simulator %.3f cores, machine %.2f of %d busy; Temporal frontend requests/s: %s",
		nodes, r.online, r.onlineBefore, r.minOnline, r.cores["apiserver"], r.cores["temporal server"], r.cores["simulator"], r.machine, runtime.NumCPU(), rates(r.calls))

	// Heartbeats alone: with the apiserver stopped (SIGSTOP) nothing reads
	// the cluster view, and what Temporal still spends is the nodes' liveness.
	require.NoError(b, apiserver.Process.Signal(syscall.SIGSTOP))
	delete(pids, "apiserver")
	cpu0, began = pidTicks(pids), time.Now()
	time.Sleep(heartbeatsWindow)
	cpu1, wall = pidTicks(pids), time.Since(began)
	require.NoError(b, apiserver.Process.Signal(syscall.SIGCONT))
	r.heartbeatsOnly = cpuSeconds(cpu0, cpu1)["temporal server"] / wall.Seconds()
	b.Logf("%d nodes, apiserver stopped: Temporal %.3f cores", nodes, r.heartbeatsOnly)

	if simulator != nil {
		r.stopTook, r.left = stopSimulator(b, simulator, tc, nodes)
		if r.left < nodes {
			b.Logf("simulator output (last 4 KiB):\n%s", lastBytes(simOut.String(), 4096))
		}
	}
	return r
}

// devTemporal is a Temporal dev server of one benchmark run.
type devTemporal struct {
	pid     int
	client  client.Client
	addr    string
	metrics string // its Prometheus endpoint
}

// startTemporal runs a Temporal dev server of its own (in-memory, llorch's
// search attributes) until the benchmark ends.
func startTemporal(b *testing.B) devTemporal {
	bin, err := testenv.Tool("temporal")
	require.NoError(b, err)
	port, err := testenv.FreePort()
	require.NoError(b, err)
	metricsPort, err := testenv.FreePort()
	require.NoError(b, err)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := []string{"server", "start-dev", "--ip", "127.0.0.1", "--port", strconv.Itoa(port), "--headless",
		"--metrics-port", strconv.Itoa(metricsPort),
		"--namespace", "default", "--log-level", "error", "--dynamic-config-value", "frontend.enableServerVersionCheck=false"}
	for _, k := range control.SearchAttributes {
		args = append(args, "--search-attribute", k.GetName()+"=Keyword")
	}
	out := &testenv.Buffer{}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(b, cmd.Start())
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var tc client.Client
	testenv.Eventually(b, time.Minute, "Temporal dev server up", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := client.DialContext(ctx, client.Options{HostPort: addr, Namespace: "default", Logger: sdklog.NewStructuredLogger(slog.New(slog.DiscardHandler))})
		if err != nil {
			return false, err.Error() + "\n" + out.String()
		}
		tc = c
		return true, ""
	})
	b.Cleanup(tc.Close)
	return devTemporal{pid: cmd.Process.Pid, client: tc, addr: addr, metrics: fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)}
}

// frontendCalls counts the requests the Temporal frontend served, by
// operation: what the control plane's CPU goes to.
func frontendCalls(url string) map[string]float64 {
	out := map[string]float64{}
	res, err := http.Get(url)
	if err != nil {
		return out
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "service_requests{") || !strings.Contains(line, `service_name="frontend"`) {
			continue
		}
		_, op, ok := strings.Cut(line, `operation="`)
		op, _, _ = strings.Cut(op, `"`)
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if ok && err == nil {
			out[op] += v
		}
	}
	return out
}

// countNodes counts running node workflows in state st by the NodeState
// search attribute (the apiserver's llorch_nodes gauge reads the same).
func countNodes(b *testing.B, tc client.Client, st node.State) int {
	return countWorkflows(b, tc, fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running' AND %s = '%s'",
		node.WorkflowType, node.NodeStateKey.GetName(), st))
}

// countWorkflows is one visibility count: cheap beside what is measured.
func countWorkflows(b *testing.B, tc client.Client, query string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := tc.CountWorkflow(ctx, &workflowservice.CountWorkflowExecutionsRequest{Query: query})
	if err != nil {
		b.Logf("count %q: %v", query, err)
		return -1
	}
	return int(resp.GetCount())
}

// stopSimulator SIGTERMs the simulator and waits for it (at most 45 s):
// how long it took, and how many node workflows ended (Left) by then.
func stopSimulator(b *testing.B, sim *exec.Cmd, tc client.Client, nodes int) (time.Duration, int) {
	began := time.Now()
	_ = sim.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = sim.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(45 * time.Second):
		b.Logf("simulator still running 45 s after SIGTERM: killed")
		_ = sim.Process.Kill()
		<-done
	}
	took := time.Since(began)
	// Visibility lags the workflows' ends by a moment.
	left, deadline := 0, time.Now().Add(10*time.Second)
	for left < nodes && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		left = countWorkflows(b, tc, fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Completed'", node.WorkflowType))
	}
	return took, left
}

// heartbeatsSent sums llorch_node_heartbeats_total over the simulator's nodes.
func heartbeatsSent(addr string, running bool) float64 {
	if !running {
		return 0
	}
	res, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0
	}
	defer res.Body.Close()
	sum := 0.0
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "llorch_node_heartbeats_total{") {
			continue
		}
		if v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// pidTicks reads the CPU time of each role's one process.
func pidTicks(pids map[string]int) cpuTicks {
	out := cpuTicks{}
	for role, pid := range pids {
		if t, ok := procTicks(pid); ok {
			out[role] = map[int]uint64{pid: t}
		}
	}
	return out
}

// machineTicks is the busy CPU time of the whole machine (every process,
// others' included) in clock ticks, from /proc/stat.
func machineTicks() uint64 {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0
	}
	defer f.Close()
	line, _ := bufio.NewReader(f).ReadString('\n')
	// cpu user nice system idle iowait irq softirq steal guest guest_nice:
	// busy is user, nice, system, irq and softirq (guest time is in user).
	fields := strings.Fields(line)
	var busy uint64
	for _, i := range []int{1, 2, 3, 6, 7} {
		if i < len(fields) {
			n, _ := strconv.ParseUint(fields[i], 10, 64)
			busy += n
		}
	}
	return busy
}

// pprofAddr is a free loopback address for --pprof-addr with
// LLORCH_BENCH_PROFILE, "" (off) without.
func pprofAddr(b *testing.B) string {
	if profileDir == "" {
		return ""
	}
	p, err := testenv.FreePort()
	require.NoError(b, err)
	return fmt.Sprintf("127.0.0.1:%d", p)
}

func lastBytes(s string, n int) string { return s[max(0, len(s)-n):] }
