package devcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/testenv"
)

// TestDevEndToEnd builds llorch and runs `llorch dev` as a user would: waits
// for "is up", sees its node Online through the REST API with the token from
// dev.env, stops it with SIGTERM, checks exit 0 and that no process is left,
// then does it again on the same state dir (new ports) to prove the state is
// reused: same token, the Temporal database reopened, the node back Online.
// A third run is SIGKILLed: its children must die with it.
func TestDevEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end: builds llorch and starts Temporal (-short)")
	}
	root := testenv.RepoRoot()
	temporalBin, vgwBin := filepath.Join(root, "bin", "temporal"), filepath.Join(root, "bin", "versitygw")
	for _, b := range []string{temporalBin, vgwBin} {
		if _, err := os.Stat(b); err != nil {
			t.Skipf("end-to-end needs %s (run `just dev`, or `%s` and `%s` with GOBIN=%s/bin)",
				b, temporalInstall, versitygwInstall, root)
		}
	}
	tmp := t.TempDir()
	exe := testenv.Llorch(t)

	home := filepath.Join(tmp, "home")
	const nodeID = "e2e-node"
	// Belt and braces for a failed run: nothing of ours may survive the
	// test. Only processes whose command line names our temp home.
	t.Cleanup(func() { testenv.KillMentioning(home) })
	// up starts llorch dev on the same home and new ports and waits until
	// it is up; p[3] is the API's port, p[4] the worker's metrics port.
	up := func(extra ...string) (d *devProc, p []int) {
		p = freePorts(t, 5)
		d = startDev(t, exe, tmp, append([]string{"--home", home, "--node-id", nodeID,
			"--temporal-bin", temporalBin, "--versitygw-bin", vgwBin,
			"--temporal-port", strconv.Itoa(p[0]), "--ui-port", strconv.Itoa(p[1]), "--s3-port", strconv.Itoa(p[2]),
			"--api-port", strconv.Itoa(p[3]), "--worker-metrics-port", strconv.Itoa(p[4])}, extra...)...)
		d.waitUp(t, 4*time.Minute)
		return d, p
	}

	var tokens []string
	for run := 1; run <= 2; run++ {
		// The second run has two apiservers behind the balancer.
		var extra []string
		if run == 2 {
			extra = []string{"--apiservers", "2"}
		}
		t.Logf("run %d %v", run, extra)
		d, p := up(extra...)

		env, err := config.ReadDevEnv(home)
		require.NoError(t, err)
		token := env["LLORCH_API_TOKEN"]
		require.Regexp(t, `^[0-9a-f]{64}$`, token)
		tokens = append(tokens, token)
		apiURL := env["LLORCH_API_URL"]
		require.Equal(t, "http://127.0.0.1:"+strconv.Itoa(p[3]), apiURL)

		waitNodeOnline(t, d, apiURL, token, nodeID, 2*time.Minute)
		requireLink(t, apiURL, token, env["LLORCH_LINK_TOKEN"], nodeID)
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", p[4]))
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode, "worker metrics on --worker-metrics-port")

		pids := d.childPIDs(t)
		requireNoSecretInCmdline(t, env, d.cmd.Process.Pid, pids)
		if run == 1 {
			require.Len(t, pids, 4, "the banner lists temporal, s3, apiserver and worker")
		} else {
			require.Len(t, pids, 5, "the banner lists temporal, s3, two apiservers and worker")
			killReplica(t, d, pids, apiURL, token, nodeID)
		}
		require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
		d.waitExit(t, 2*time.Minute)
		for tag, pid := range pids {
			assert.Eventually(t, func() bool { return !testenv.Alive(pid) }, 30*time.Second, 50*time.Millisecond,
				"%s (pid %d) outlived llorch dev", tag, pid)
		}
		assert.Eventually(t, func() bool { return len(testenv.Mentioning(home)) == 0 }, 30*time.Second, 50*time.Millisecond,
			"processes left behind after run %d: %v", run, testenv.Mentioning(home))
		assert.Contains(t, d.output(), "all stopped")
	}
	assert.Equal(t, tokens[0], tokens[1], "the second run reuses the token")

	// A llorch dev killed outright cannot stop its children; their
	// parent-death signal must.
	t.Log("run 3: SIGKILL")
	d, _ := up()
	pids := d.childPIDs(t)
	require.NoError(t, d.cmd.Process.Kill())
	<-d.done
	require.Eventually(t, func() bool { return len(testenv.Mentioning(home)) == 0 }, time.Minute, 50*time.Millisecond,
		"children outlived a SIGKILLed llorch dev: %v", testenv.Mentioning(home))
	for tag, pid := range pids {
		// A dying process loses its command line before it is a zombie:
		// wait for it to get there rather than catch it mid-exit.
		assert.Eventually(t, func() bool { return !testenv.Alive(pid) }, time.Minute, 50*time.Millisecond,
			"%s (pid %d) outlived a SIGKILLed llorch dev", tag, pid)
	}
}

// killReplica kills -9 the second of two apiserver replicas: llorch dev
// lives on, the API answers through the balancer while it is gone, and the
// replica is restarted (its new pid joins pids).
func killReplica(t *testing.T, d *devProc, pids map[string]int, apiURL, token, nodeID string) {
	t.Helper()
	for i := 1; i <= 2; i++ {
		require.Contains(t, d.output(), fmt.Sprintf("apiserver replica %d/2 pid %d on 127.0.0.1:", i, pids["apiserver-"+strconv.Itoa(i)]))
	}
	require.NoError(t, syscall.Kill(pids["apiserver-2"], syscall.SIGKILL))
	// Every request of these goes through: the balancer skips the dead one.
	for range 4 {
		state, err := listedState(apiURL, token, nodeID)
		require.NoError(t, err, "through the balancer with replica 2 killed")
		require.Equal(t, "Online", state)
	}
	restarted := regexp.MustCompile(`apiserver replica 2/2 restarted: pid (\d+)`)
	var m []string
	require.Eventually(t, func() bool { m = restarted.FindStringSubmatch(d.output()); return m != nil },
		time.Minute, 50*time.Millisecond, "replica 2 restarted")
	pid, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	pids["apiserver-2 (restarted)"] = pid
	assert.Contains(t, d.output(), "signal killed; the others keep serving")
	select {
	case <-d.done:
		t.Fatalf("llorch dev exited after a replica was killed: %v", d.err)
	default:
	}
}

type devProc struct {
	cmd  *exec.Cmd
	out  *testenv.Buffer
	up   chan struct{}
	done chan struct{}
	err  error
}

func startDev(t *testing.T, exe, dir string, args ...string) *devProc {
	t.Helper()
	cmd := exec.Command(exe, append([]string{"dev"}, args...)...)
	cmd.Dir = dir // no ./bin here: the binaries come from the flags
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LLORCH_") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	r, w, err := os.Pipe()
	require.NoError(t, err)
	cmd.Stdout, cmd.Stderr = w, w
	// If the test binary dies, llorch dev dies, and its children with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	w.Close()
	d := &devProc{cmd: cmd, out: &testenv.Buffer{}, up: make(chan struct{}), done: make(chan struct{})}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		upSeen := false
		for sc.Scan() {
			fmt.Fprintln(d.out, sc.Text())
			// The banner's last line: the pids line before it is in d.out.
			if !upSeen && strings.Contains(sc.Text(), "stop: Ctrl-C") {
				upSeen = true
				close(d.up)
			}
		}
		_, _ = bufioDrain(r)
	}()
	go func() {
		d.err = cmd.Wait()
		<-scanned
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			_ = cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("llorch dev output:\n%s", d.out.String())
		}
	})
	return d
}

// bufioDrain keeps reading after a too-long line stopped the scanner, so
// llorch dev never blocks on a full pipe.
func bufioDrain(r *os.File) (int64, error) {
	defer r.Close()
	buf := make([]byte, 32<<10)
	var n int64
	for {
		m, err := r.Read(buf)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
}

func (d *devProc) output() string { return d.out.String() }

func (d *devProc) waitUp(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-d.up:
	case <-d.done:
		t.Fatalf("llorch dev exited before it was up: %v", d.err)
	case <-time.After(timeout):
		t.Fatalf("llorch dev not up within %s", timeout)
	}
}

func (d *devProc) waitExit(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-d.done:
		require.NoError(t, d.err, "llorch dev must exit 0 after SIGTERM")
	case <-time.After(timeout):
		t.Fatalf("llorch dev did not exit within %s of SIGTERM", timeout)
	}
}

var pidsLine = regexp.MustCompile(`pids: (.*)`)

// childPIDs parses "pids: temporal 1, s3 2, apiserver 3, worker 4".
// requireNoSecretInCmdline: no secret of dev.env is on the command line of
// any part of the cluster (or of llorch dev), where every local user reads
// it in ps and /proc/<pid>/cmdline; they pass in the environment.
func requireNoSecretInCmdline(t *testing.T, env map[string]string, devPID int, pids map[string]int) {
	t.Helper()
	secrets := map[string]string{}
	for _, k := range []string{envToken, envLinkToken, envS3Access, envS3Secret} {
		require.NotEmpty(t, env[k], k)
		secrets[k] = env[k]
	}
	procs := map[string]int{"llorch dev": devPID}
	for tag, pid := range pids {
		procs[tag] = pid
	}
	for tag, pid := range procs {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		require.NoError(t, err, tag)
		require.NotEmpty(t, raw, "%s: a command line to check", tag)
		for k, v := range secrets {
			require.NotContains(t, string(raw), v, "%s (pid %d) has %s on its command line", tag, pid, k)
		}
	}
}

func (d *devProc) childPIDs(t *testing.T) map[string]int {
	t.Helper()
	m := pidsLine.FindStringSubmatch(d.output())
	require.NotNil(t, m, "no pids line in the banner")
	out := map[string]int{}
	for _, part := range strings.Split(m[1], ", ") {
		f := strings.Fields(part)
		require.Len(t, f, 2, part)
		pid, err := strconv.Atoi(f[1])
		require.NoError(t, err)
		out[f[0]] = pid
	}
	return out
}

func waitNodeOnline(t *testing.T, d *devProc, apiURL, token, nodeID string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		state, err := listedState(apiURL, token, nodeID)
		if err == nil && state == "Online" {
			return
		}
		last = fmt.Sprintf("state %q, err %v", state, err)
		select {
		case <-d.done:
			t.Fatalf("llorch dev exited while waiting for node %s Online (%s): %v", nodeID, last, d.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s not Online in GET /v2/nodes within %s: %s", nodeID, timeout, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// requireLink reads the node's link, at the URL its registration gives,
// with the link token from dev.env.
func requireLink(t *testing.T, apiURL, token, linkToken, nodeID string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, apiURL+"/v2/nodes/"+nodeID, nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var n struct {
		Inventory node.Inventory `json:"inventory"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&n))
	require.NotEmpty(t, n.Inventory.LinkURL, "the registration carries the link's URL")
	st, err := (&link.Client{URL: n.Inventory.LinkURL, Token: linkToken}).State(context.Background())
	require.NoError(t, err, "the dev worker's link takes the token of dev.env")
	require.Equal(t, nodeID, st.NodeID)
}

// listedState finds nodeID in GET /v2/nodes, as a user's curl would.
func listedState(apiURL, token, nodeID string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/v2/nodes", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /v2/nodes: %s", resp.Status)
	}
	var body struct {
		Nodes []struct {
			NodeID string `json:"node_id"`
			State  string `json:"state"`
		} `json:"nodes"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return "", err
	}
	for _, n := range body.Nodes {
		if n.NodeID == nodeID {
			return n.State, nil
		}
	}
	return "", fmt.Errorf("node %s not listed (%d nodes)", nodeID, len(body.Nodes))
}
