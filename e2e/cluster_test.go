package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	historypb "go.temporal.io/api/history/v1"

	"github.com/llorch/llorch/balancer"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

const token = "e2e-token"

// proc is one llorch process with its output kept for failure messages.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *testenv.Buffer
	done chan struct{}
	// exit is how the process ended, set before done closes.
	exit string
}

type cluster struct {
	t    *testing.T
	bin  string
	home string
	// api is what every test talks to: the one apiserver, or with several
	// replicas the round-robin balancer in front of them.
	api     string
	apiArgs []string // of every replica, but --addr
	// apiProc is the first replica; replicas are all of them, on
	// replicaAddrs (replicaAddrs[0] is api when there is one replica).
	apiProc      *proc
	replicas     []*proc
	replicaAddrs []string
	// replicaTLS, when set, is how to reach replicas that serve HTTPS
	// (--tls-cert): its RootCAs trust their CA. c.api is then always the
	// balancer, which speaks TLS to them.
	replicaTLS *tls.Config
}

// replicaURL is the base URL of the replica at addr.
func (c *cluster) replicaURL(addr string) string {
	if c.replicaTLS != nil {
		return "https://" + addr
	}
	return "http://" + addr
}

// replicaHTTP reaches the replicas directly.
func (c *cluster) replicaHTTP() *http.Client {
	if c.replicaTLS == nil {
		return http.DefaultClient
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: c.replicaTLS}}
}

// apiServers is how many apiserver replicas newCluster runs:
// LLORCH_E2E_APISERVERS, default 1 (no balancer).
func apiServers(t *testing.T) int {
	v := os.Getenv("LLORCH_E2E_APISERVERS")
	if v == "" {
		return 1
	}
	n, err := strconv.Atoi(v)
	require.NoError(t, err, "LLORCH_E2E_APISERVERS")
	require.True(t, n >= 1 && n <= 16, "LLORCH_E2E_APISERVERS=%d: 1 to 16", n)
	return n
}

// start runs llorch with args. Args of the form LLORCH_X=value go in its
// environment instead: secrets are never on a command line (the
// configuration refuses them there), so a test passes one that way.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	// Every process encrypts its payloads with the shared env's codec.
	return startEnv(t, name, []string{codec.EnvKeys + "=" + env.CodecKeys}, args...)
}

// startEnv is start with extra in the environment beyond PATH, HOME and
// the API token.
func startEnv(t *testing.T, name string, extra []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, out: &testenv.Buffer{}, done: make(chan struct{})}
	// Nothing from the developer's shell or dev cluster leaks in.
	environ := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token,
		"LLORCH_S3_ACCESS_KEY=" + env.S3.AccessKey, "LLORCH_S3_SECRET_KEY=" + env.S3.SecretKey}
	var argv []string
	for _, a := range args {
		if envArg.MatchString(a) {
			environ = append(environ, a)
		} else {
			argv = append(argv, a)
		}
	}
	p.cmd = exec.Command(testenv.Llorch(t), argv...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.Env = append(environ, extra...)
	require.NoError(t, p.cmd.Start())
	go func() {
		err := p.cmd.Wait()
		p.exit = fmt.Sprintf("%v at %s", err, time.Now().UTC().Format("15:04:05.000"))
		if err == nil {
			p.exit = "exit status 0 at " + time.Now().UTC().Format("15:04:05.000")
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		// A process that ended on its own says how: a silent death
		// (SIGKILL) leaves nothing in its log.
		ended := p.exited()
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() && ended {
			t.Logf("--- %s had ended before the test's cleanup: %s", name, p.exit)
		}
		if t.Failed() {
			out := p.out.String()
			var problems []string
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "level=ERROR") || strings.Contains(line, "level=WARN") || strings.Contains(line, "panic") {
					problems = append(problems, line)
				}
			}
			t.Logf("--- %s: warnings and errors ---\n%s\n--- %s: last 4 KiB ---\n%s", name,
				strings.Join(problems, "\n"), name, out[max(0, len(out)-4096):])
		}
	})
	return p
}

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	require.NoError(t, p.cmd.Process.Signal(sig))
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %s", p.name, timeout)
		return -1
	}
}

// newCluster runs the apiservers of a test (LLORCH_E2E_APISERVERS of them)
// with apiArgs on top of the shared Temporal and S3.
func newCluster(t *testing.T, apiArgs ...string) *cluster {
	t.Helper()
	return newClusterN(t, apiServers(t), apiArgs...)
}

// newClusterN runs n apiserver replicas; with n > 1 a balancer (the one
// `llorch dev --apiservers` runs) takes c.api and every request goes
// round-robin to the next replica, as behind a Kubernetes Service.
func newClusterN(t *testing.T, n int, apiArgs ...string) *cluster {
	t.Helper()
	return newClusterTLS(t, n, nil, apiArgs...)
}

// newClusterTLS is newClusterN whose replicas serve HTTPS (apiArgs give
// them --tls-cert and --tls-key) with a certificate replicaTLS verifies;
// nil: plain HTTP. With TLS the balancer always runs, on plain loopback
// HTTP, so the tests' helpers work unchanged.
func newClusterTLS(t *testing.T, n int, replicaTLS *tls.Config, apiArgs ...string) *cluster {
	t.Helper()
	port, err := testenv.FreePort()
	require.NoError(t, err)
	c := &cluster{t: t, home: t.TempDir(), api: fmt.Sprintf("127.0.0.1:%d", port), replicaTLS: replicaTLS}
	if n == 1 && replicaTLS == nil {
		c.replicaAddrs = []string{c.api}
	} else {
		for range n {
			port, err := testenv.FreePort()
			require.NoError(t, err)
			c.replicaAddrs = append(c.replicaAddrs, fmt.Sprintf("127.0.0.1:%d", port))
		}
		c.serveBalancer()
	}
	// Engines outlive a killed worker for their lease; none outlives the
	// test (this runs after the workers' own cleanups).
	t.Cleanup(func() { testenv.KillMentioning(c.home) })
	// Pools and tasks a test leaves running would keep the shared server's
	// control workers busy in later tests.
	t.Cleanup(func() { env.TerminateRunning(t, "Pool", "Task") })
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	// Every test starts from an empty catalog (tests here run one at a
	// time), so they hold on a re-run against the same services.
	entries, err := store.ListEntries(context.Background())
	require.NoError(t, err)
	for _, e := range entries {
		require.NoError(t, store.DeleteEntry(context.Background(), e.ID))
	}
	c.apiArgs = append([]string{"apiserver", "--temporal-address", env.TemporalAddr, "--home", c.home}, s3Flags(env.S3.Endpoint)...)
	c.apiArgs = append(c.apiArgs, apiArgs...)
	c.startAPI()
	return c
}

// serveBalancer puts the balancer over the replicas on c.api, for the
// rest of the test.
func (c *cluster) serveBalancer() {
	var urls []string
	for _, a := range c.replicaAddrs {
		urls = append(urls, c.replicaURL(a))
	}
	logs := &testenv.Buffer{}
	b, err := balancer.New(urls, balancer.Options{
		HealthInterval: 500 * time.Millisecond,
		BackendTLS:     c.replicaTLS,
		Logger:         slog.New(slog.NewTextHandler(logs, nil)),
	})
	require.NoError(c.t, err)
	ln, err := net.Listen("tcp", c.api)
	require.NoError(c.t, err)
	srv := &http.Server{Handler: b, ReadHeaderTimeout: 30 * time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	go b.Watch(ctx)
	go func() { _ = srv.Serve(ln) }()
	c.t.Cleanup(func() {
		cancel()
		_ = srv.Close()
		b.Close()
		if c.t.Failed() {
			c.t.Logf("--- balancer ---\n%s", logs.String())
		}
	})
}

// startAPI starts every apiserver replica (again: a replica still running
// is stopped with SIGTERM first) and waits until each is healthy.
func (c *cluster) startAPI() {
	c.t.Helper()
	for i := range c.replicaAddrs {
		if i < len(c.replicas) {
			if p := c.replicas[i]; !p.exited() {
				p.signal(c.t, syscall.SIGTERM)
				p.wait(c.t, 30*time.Second)
			}
		}
		c.startReplica(i)
	}
}

// startReplica starts replica i on its address and waits for its /health.
func (c *cluster) startReplica(i int) {
	c.t.Helper()
	name := "apiserver"
	if len(c.replicaAddrs) > 1 {
		name = fmt.Sprintf("apiserver-%d", i+1)
	}
	addr := c.replicaAddrs[i]
	api := start(c.t, name, append([]string{c.apiArgs[0], "--addr", addr}, c.apiArgs[1:]...)...)
	if i < len(c.replicas) {
		c.replicas[i] = api
	} else {
		c.replicas = append(c.replicas, api)
	}
	c.apiProc = c.replicas[0]
	testenv.Eventually(c.t, 60*time.Second, name+" healthy", func() (bool, string) {
		res, err := c.replicaHTTP().Get(c.replicaURL(addr) + "/health")
		if err != nil {
			return false, err.Error() + "\n" + api.out.String()
		}
		res.Body.Close()
		return res.StatusCode == 200, res.Status
	})
}

// extraAPI starts another apiserver replica on its own port, with the same
// Temporal, bucket and token, and waits until it is healthy; its address.
func (c *cluster) extraAPI() string {
	c.t.Helper()
	port, err := testenv.FreePort()
	require.NoError(c.t, err)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := append(append([]string(nil), c.apiArgs...), "--addr", addr)
	api := start(c.t, "apiserver "+addr, args...)
	testenv.Eventually(c.t, 60*time.Second, "second apiserver healthy", func() (bool, string) {
		res, err := c.replicaHTTP().Get(c.replicaURL(addr) + "/health")
		if err != nil {
			return false, err.Error() + "\n" + api.out.String()
		}
		res.Body.Close()
		return res.StatusCode == 200, res.Status
	})
	return addr
}

// killReplica kills -9 replica i and waits for it to be gone.
func (c *cluster) killReplica(i int) {
	c.t.Helper()
	p := c.replicas[i]
	p.signal(c.t, syscall.SIGKILL)
	p.wait(c.t, 10*time.Second)
}

func (c *cluster) worker(id string, extra ...string) *proc {
	args := append([]string{"worker", "--node-id", id, "--temporal-address", env.TemporalAddr, "--home", c.home,
		"--metrics-addr", "127.0.0.1:0", "--heartbeat-interval", "1s"}, s3Flags(env.S3.Endpoint)...)
	return start(c.t, "worker "+id, append(args, extra...)...)
}

// onlineWorker starts a worker for node id and waits for the node to be Online.
func (c *cluster) onlineWorker(id string, extra ...string) *proc {
	c.t.Helper()
	w := c.worker(id, extra...)
	c.waitState(id, node.Online, 60*time.Second)
	return w
}

// leave stops worker w of node id (SIGTERM) and waits for the node to have Left.
func (c *cluster) leave(w *proc, id string) {
	c.t.Helper()
	w.signal(c.t, syscall.SIGTERM)
	c.waitState(id, node.Left, 20*time.Second)
}

// envArg is an argument of start that is an env var of the process.
var envArg = regexp.MustCompile(`^LLORCH_[A-Z0-9_]+=`)

// s3Flags point a process at the test bucket (through endpoint, which may
// be a proxy); start puts its keys in the environment.
func s3Flags(endpoint string) []string {
	return []string{"--s3-endpoint", endpoint, "--s3-bucket", env.S3.Bucket}
}

func (c *cluster) get(path string) (int, map[string]any) {
	req, _ := http.NewRequest("GET", "http://"+c.api+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, map[string]any{"error": err.Error()}
	}
	defer res.Body.Close()
	var body map[string]any
	raw, _ := io.ReadAll(res.Body)
	_ = json.Unmarshal(raw, &body)
	return res.StatusCode, body
}

func (c *cluster) post(path string, body string) int {
	req, _ := http.NewRequest("POST", "http://"+c.api+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	res.Body.Close()
	return res.StatusCode
}

func (c *cluster) node(id string) map[string]any {
	_, body := c.get("/v2/nodes/" + id)
	return body
}

func (c *cluster) state(id string) string {
	s, _ := c.node(id)["state"].(string)
	return s
}

// waitState polls the API and returns how long the node took to get there.
func (c *cluster) waitState(id string, want node.State, timeout time.Duration) time.Duration {
	c.t.Helper()
	start := time.Now()
	testenv.Eventually(c.t, timeout, fmt.Sprintf("node %s %s", id, want), func() (bool, string) {
		s := c.state(id)
		return s == string(want), s
	})
	return time.Since(start)
}

func TestThreeNodesJoinDieReturnLeave(t *testing.T) {
	c := newCluster(t)
	port, err := testenv.FreePort()
	require.NoError(t, err)
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", port)
	n1 := c.worker("e2e-n1", "--nvml-mock", "dgxh100", "--metrics-addr", metricsAddr)
	n2 := c.worker("e2e-n2")
	n3 := c.worker("e2e-n3")
	for _, id := range []string{"e2e-n1", "e2e-n2", "e2e-n3"} {
		c.waitState(id, node.Online, 60*time.Second)
	}
	_, list := c.get("/v2/nodes?state=online")
	ids := []string{}
	for _, n := range list["nodes"].([]any) {
		ids = append(ids, n.(map[string]any)["node_id"].(string))
	}
	require.Subset(t, ids, []string{"e2e-n1", "e2e-n2", "e2e-n3"})
	inv := c.node("e2e-n1")["inventory"].(map[string]any)
	require.Len(t, inv["gpus"], 8)
	inv3 := c.node("e2e-n3")["inventory"].(map[string]any)
	require.Equal(t, true, inv3["cpu_only"], "no NVIDIA driver here: the plain worker is CPU-only")
	require.NotEmpty(t, inv3["nvml_error"])

	// The worker exports its registration, beats and per-GPU figures.
	testenv.Eventually(t, 10*time.Second, "worker metrics", func() (bool, string) {
		res, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			return false, err.Error()
		}
		defer res.Body.Close()
		raw, _ := io.ReadAll(res.Body)
		m := string(raw)
		return strings.Contains(m, `llorch_gpu_memory_total_bytes{gpu="7",node_id="e2e-n1"} 8.589934592e+10`) &&
			strings.Contains(m, `llorch_gpu_utilization_ratio{gpu="0",node_id="e2e-n1"}`) &&
			strings.Contains(m, `llorch_node_registrations_total{node_id="e2e-n1",via="worker"} 1`) &&
			strings.Contains(m, `llorch_node_heartbeats_total{node_id="e2e-n1"}`), m
	})

	// kill -9: no deregistration, only the missing heartbeats tell.
	n2.signal(t, syscall.SIGKILL)
	d := c.waitState("e2e-n2", node.Offline, 10*time.Second)
	t.Logf("kill -9 detected after %s", d)
	require.Equal(t, "Online", c.state("e2e-n1"))

	// Restarted with the same id, it resumes its own queue and is Online.
	n2 = c.worker("e2e-n2")
	c.waitState("e2e-n2", node.Online, 30*time.Second)

	// SIGTERM deregisters at once.
	n3.signal(t, syscall.SIGTERM)
	c.waitState("e2e-n3", node.Left, 10*time.Second)
	require.Equal(t, 0, n3.wait(t, 30*time.Second))
	last := lastTransition(c.node("e2e-n3"))
	require.Contains(t, last["reason"], "worker shutting down")

	n1.signal(t, syscall.SIGTERM)
	n2.signal(t, syscall.SIGTERM)
	c.waitState("e2e-n1", node.Left, 10*time.Second)
	c.waitState("e2e-n2", node.Left, 10*time.Second)
	recordHistory(t, node.WorkflowID("e2e-n2"), "node-worker-killed-restarted-left")
	recordHistory(t, node.WorkflowID("e2e-n1"), "node-worker-online-left")
}

func lastTransition(n map[string]any) map[string]any {
	tr := n["transitions"].([]any)
	return tr[len(tr)-1].(map[string]any)
}

// A SIGTERM that lands while the worker is still starting still ends in a
// clean deregistration, not in the default action killing it.
func TestSIGTERMDuringStart(t *testing.T) {
	c := newCluster(t)
	id := "e2e-early"
	w := c.worker(id)
	testenv.Eventually(t, 60*time.Second, "node registered by this worker", func() (bool, string) {
		s := c.state(id)
		return s != "" && s != string(node.Left), s // Left: a previous run's
	})
	w.signal(t, syscall.SIGTERM)
	require.Equal(t, 0, w.wait(t, 30*time.Second))
	c.waitState(id, node.Left, 10*time.Second)
}

// Detection time of a kill -9, over several kills: the figure the closing
// note of the node-lifecycle issue reports.
func TestKillDetectionTime(t *testing.T) {
	c := newCluster(t)
	const rounds = 5
	var times []time.Duration
	w := c.worker("e2e-kill")
	for i := 0; i < rounds; i++ {
		c.waitState("e2e-kill", node.Online, 30*time.Second)
		// Kill just after a beat: the worst case is a full timeout from here.
		w.signal(t, syscall.SIGKILL)
		w.wait(t, 10*time.Second)
		times = append(times, c.waitState("e2e-kill", node.Offline, 10*time.Second))
		w = c.worker("e2e-kill")
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	t.Logf("kill -9 to Offline over %d kills (heartbeat 1s, timeout 3s): median %s, max %s, all %v",
		rounds, times[rounds/2], times[rounds-1], times)
	require.Less(t, times[rounds-1], 10*time.Second)
}

// Heartbeats travel as activity heartbeat details: a node beating five
// times a second adds nothing to its workflow history.
func TestHeartbeatsDoNotGrowHistory(t *testing.T) {
	c := newCluster(t)
	id := "e2e-quiet"
	w := c.onlineWorker(id, "--heartbeat-interval", "200ms")
	length := func() int64 {
		d, err := env.Temporal.DescribeWorkflowExecution(context.Background(), node.WorkflowID(id), "")
		require.NoError(t, err)
		return d.GetWorkflowExecutionInfo().GetHistoryLength()
	}
	liveAt := func() time.Time {
		live, _ := c.node(id)["live"].(map[string]any)
		at, _ := live["at"].(string)
		ts, _ := time.Parse(time.RFC3339Nano, at)
		return ts
	}
	testenv.Eventually(t, 10*time.Second, "first heartbeat recorded", func() (bool, string) {
		return !liveAt().IsZero(), fmt.Sprint(c.node(id)["live"])
	})
	before, first := length(), liveAt()
	// Wait for at least ten more beats to reach the server.
	testenv.Eventually(t, 30*time.Second, "ten more heartbeats", func() (bool, string) {
		return liveAt().Sub(first) >= 2*time.Second, liveAt().String()
	})
	require.Equal(t, before, length(), "history grew while the node only heartbeat")
	c.leave(w, id)
}

// A network cut (not a crash): the worker process lives on, its link to
// Temporal is severed, then restored.
func TestNetworkCut(t *testing.T) {
	c := newCluster(t)
	proxy, err := testenv.NewProxy(env.TemporalAddr)
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	args := []string{"worker", "--node-id", "e2e-cut", "--temporal-address", proxy.Addr, "--home", c.home,
		"--metrics-addr", "127.0.0.1:0", "--heartbeat-interval", "1s"}
	w := start(t, "worker e2e-cut", args...)
	c.waitState("e2e-cut", node.Online, 60*time.Second)
	trial := testenv.NewTrial(t, "network cut between a worker and Temporal (proxy)")
	proxy.Cut()
	d := c.waitState("e2e-cut", node.Offline, 10*time.Second)
	t.Logf("network cut detected after %s", d)
	proxy.Restore()
	d = c.waitState("e2e-cut", node.Online, 60*time.Second)
	t.Logf("back Online %s after the link was restored", d)
	trial.Recovered(d, "node Online after the link is back")
	c.leave(w, "e2e-cut")
}

// Continue-as-new forced early: the node's state (drain flag, inventory,
// transitions) survives, and liveness keeps working in the new run.
func TestContinueAsNewKeepsState(t *testing.T) {
	c := newCluster(t)
	id := "e2e-can"
	w := c.onlineWorker(id, "--nvml-mock", "dgxa100", "--node-continue-as-new-events", "40")
	first := c.node(id)["workflow"].(map[string]any)["run_id"].(string)
	for i := 0; ; i++ {
		require.Less(t, i, 30, "no continue-as-new after 30 drain/undrain rounds")
		require.Equal(t, 200, c.post("/v2/nodes/"+id+"/drain", `{"reason":"round"}`))
		n := c.node(id)
		if n["workflow"].(map[string]any)["continued_as_new"].(float64) >= 1 {
			break
		}
		require.Equal(t, 200, c.post("/v2/nodes/"+id+"/undrain", ""))
	}
	n := c.node(id)
	require.Equal(t, "Draining", n["state"])
	require.NotEqual(t, first, n["workflow"].(map[string]any)["run_id"])
	require.Len(t, n["inventory"].(map[string]any)["gpus"], 8)
	require.NotEmpty(t, n["transitions"])
	require.Equal(t, "drain by "+bearer.Fingerprint(token)+": round", lastTransition(n)["reason"])
	_, list := c.get("/v2/nodes")
	seen := 0
	for _, n := range list["nodes"].([]any) {
		if n.(map[string]any)["node_id"] == id {
			seen++
		}
	}
	require.Equal(t, 1, seen, "a node that continued as new is listed once")

	// Liveness works in the new run: kill -> Offline; back -> Draining (sticky).
	w.signal(t, syscall.SIGKILL)
	c.waitState(id, node.Offline, 10*time.Second)
	w = c.worker(id, "--nvml-mock", "dgxa100", "--node-continue-as-new-events", "40")
	c.waitState(id, node.Draining, 30*time.Second)
	recordRun(t, node.WorkflowID(id), first, "node-worker-continued-as-new")
	c.leave(w, id)
}

// A node registered over REST whose heartbeats stop, then resume.
func TestHTTPAgentRecorded(t *testing.T) {
	c := newCluster(t)
	id := "e2e-http"
	require.Equal(t, 202, c.post("/v2/nodes/register", `{"node_id":"`+id+`","heartbeat_interval_ms":300,"gpus":[{"index":0,"name":"L4","memory_total_bytes":100,"memory_free_bytes":50}]}`))
	c.waitState(id, node.Online, 30*time.Second)
	require.Equal(t, 200, c.post("/v2/nodes/"+id+"/heartbeat", `{"gpus":[{"index":0,"memory_total_bytes":100,"memory_free_bytes":40}]}`))
	c.waitState(id, node.Offline, 10*time.Second)
	require.Equal(t, 200, c.post("/v2/nodes/"+id+"/heartbeat", `{}`))
	c.waitState(id, node.Online, 10*time.Second)
	req, _ := http.NewRequest("DELETE", "http://"+c.api+"/v2/nodes/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	recordHistory(t, node.WorkflowID(id), "node-http-agent")
}

// recordHistory saves the latest run's history for the replay tests when
// LLORCH_RECORD_HISTORIES=1 (see `just record-histories`).
func recordHistory(t *testing.T, workflowID, name string) { env.RecordHistory(t, workflowID, "", name) }

func recordRun(t *testing.T, workflowID, runID, name string) {
	env.RecordHistory(t, workflowID, runID, name)
}

// history reads a workflow run's events (runID "" for the latest run).
func history(t *testing.T, workflowID, runID string) *historypb.History {
	return env.History(t, workflowID, runID)
}

// llamaServerOrSkip is the llama-server binary LLORCH_LLAMA_SERVER names;
// without it the test skips with a visible line saying what is not tried.
func llamaServerOrSkip(t *testing.T, notTried string) string {
	t.Helper()
	bin := os.Getenv("LLORCH_LLAMA_SERVER")
	if bin == "" {
		t.Skip("SKIP (visible on purpose): LLORCH_LLAMA_SERVER is not set, so " + notTried)
	}
	return bin
}

// engineOf is a worker's arguments and a pool spec's engine field for the
// built-in engine (llamaServer "") or llama-server.
func engineOf(llamaServer string) (workerArgs []string, spec string) {
	if llamaServer == "" {
		return nil, ""
	}
	return []string{"--llama-server", llamaServer}, `,"engine":"llama-server"`
}
