package chaos

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// netns is a network namespace joined to this one by a veth pair: a node
// whose only way out is a link the test can cut.
type netns struct {
	name, host string // namespace, host end of the veth
	hostIP     string // address of the host end, the node's way out
	nodeIP     string // address of the namespace's end, where its link is
}

// requireRoot skips a scenario that needs namespaces or mounts.
func requireRoot(t *testing.T, what string) {
	if os.Geteuid() != 0 {
		t.Skipf("%s needs root (network namespaces, mounts)", what)
	}
}

func sh(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
}

func newNetns(t *testing.T) *netns {
	requireRoot(t, "a network partition")
	_, err := exec.LookPath("ip")
	require.NoError(t, err, "iproute2's ip is needed for the partition scenario")
	id := os.Getpid() % 10000
	n := &netns{name: fmt.Sprintf("llorch-chaos-%d", id), host: fmt.Sprintf("lc%dh", id)}
	peer := fmt.Sprintf("lc%dn", id)
	// A /30 of 10.231/16 per test process: no clash with a run beside it.
	sub := fmt.Sprintf("10.231.%d.%d", id%250, (id/250)%64*4)
	base := net.ParseIP(sub).To4()
	n.hostIP = net.IPv4(base[0], base[1], base[2], base[3]+1).String()
	n.nodeIP = net.IPv4(base[0], base[1], base[2], base[3]+2).String()
	peerIP := n.nodeIP
	_ = exec.Command("ip", "link", "del", n.host).Run() // left by a killed run
	_ = exec.Command("ip", "netns", "del", n.name).Run()
	sh(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", n.host).Run()
		_ = exec.Command("ip", "netns", "del", n.name).Run()
	})
	sh(t, "ip", "link", "add", n.host, "type", "veth", "peer", "name", peer)
	sh(t, "ip", "link", "set", peer, "netns", n.name)
	sh(t, "ip", "addr", "add", n.hostIP+"/30", "dev", n.host)
	sh(t, "ip", "link", "set", n.host, "up")
	sh(t, "ip", "netns", "exec", n.name, "ip", "addr", "add", peerIP+"/30", "dev", peer)
	sh(t, "ip", "netns", "exec", n.name, "ip", "link", "set", peer, "up")
	sh(t, "ip", "netns", "exec", n.name, "ip", "link", "set", "lo", "up")
	return n
}

// offer makes a loopback server reachable from the namespace, at the host
// end of the veth.
func (n *netns) offer(t *testing.T, target string) string {
	p, err := testenv.NewProxyOn(n.hostIP+":0", target)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p.Addr
}

func (n *netns) cut(t *testing.T)     { sh(t, "ip", "link", "set", n.host, "down") }
func (n *netns) restore(t *testing.T) { sh(t, "ip", "link", "set", n.host, "up") }

// Network partition of one node: its worker runs in its own namespace and
// reaches Temporal, S3 and the apiserver through a veth pair, which is cut
// mid-generation and restored later. The node goes Offline; the task moves
// to the other node and completes whole; the pool gives the node up. Once
// the link is back the same worker process is Online again, the engine it
// kept running through the partition is fenced, and the pool is Ready on a
// new epoch with exactly one engine.
func TestNetworkPartition(t *testing.T) {
	ns := newNetns(t)
	trial := testenv.NewTrial(t, "network partition of one node (netns, veth cut)")
	dir := t.TempDir()
	t.Cleanup(func() { testenv.KillMentioning(dir) })
	t.Cleanup(func() { env.TerminateRunning(t, "Pool", "Task") })
	bin := testenv.Llorch(t)
	task1, task2 := testenv.Unique("part-1"), testenv.Unique("part-2")

	a := api{t: t, addr: "127.0.0.1:" + strconv.Itoa(port(t))}
	advertise := ns.offer(t, a.addr)
	start(t, "apiserver", bin, append([]string{"apiserver", "--addr", a.addr, "--advertise-url", "http://" + advertise,
		"--temporal-address", env.TemporalAddr, "--home", filepath.Join(dir, "api")}, s3Flags(env.S3.Endpoint)...)...)
	worker := func(id, temporal, s3 string) []string {
		return append([]string{"worker", "--node-id", id, "--temporal-address", temporal, "--home", filepath.Join(dir, "home"),
			"--metrics-addr", "127.0.0.1:0", "--heartbeat-interval", "1s"}, s3Flags(s3)...)
	}
	// Node A lives in the namespace, its link on the namespace's end of
	// the veth (the apiserver follows it there); B beside the servers.
	wa := start(t, "worker-a", "ip", append([]string{"netns", "exec", ns.name, bin},
		append(worker("part-a", ns.offer(t, env.TemporalAddr), ns.offer(t, env.S3.Endpoint)),
			"--link-addr", ns.nodeIP+":0")...)...)
	start(t, "worker-b", bin, worker("part-b", env.TemporalAddr, env.S3.Endpoint)...)
	a.waitNode("part-a", "Online", 2*time.Minute)
	a.waitNode("part-b", "Online", 2*time.Minute)
	pushModel(t, a, "part-model", modelstore.TinyOptions{Embd: 512, Layers: 8, Context: 4096, Seed: 5})
	ha := a.pool("pa", "part-model", "part-a", 2)
	hb := a.pool("pb", "part-model", "part-b", 2)
	oldPID, oldEpoch := int(ha["pid"].(float64)), ha["epoch"].(float64)

	const n = 1200
	want := testenv.Greedy(t, hb["url"].(string), "Once upon a time", n)
	code, body := a.call("POST", "/v2/tasks", `{"task_id":"`+task1+`","model_ref":"part-model","prompt":"Once upon a time","max_tokens":1200,
		"determinism":"strict","placement":{"mode":"prefer","prefer_pools":["pa"]}}`)
	require.Equal(t, 202, code, body)
	ch, stop := testenv.Follow(t, a.addr, token, task1, "")
	defer stop()
	var evs []testenv.Event
	for ev := range ch {
		evs = append(evs, ev)
		if ev.Name == "token" && ev.Data["i"].(float64) == 100 {
			break
		}
	}
	require.Equal(t, "pa", evs[0].Data["pool_id"], "the task started on the partitioned node's pool")

	cutAt := time.Now()
	ns.cut(t)
	offline := make(chan time.Duration, 1)
	go func() { // detection, timed beside the stream
		for time.Since(cutAt) < time.Minute {
			if _, body := a.call("GET", "/v2/nodes/part-a", ""); body["state"] == "Offline" {
				offline <- time.Since(cutAt)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		offline <- -1
	}()
	evs = append(evs, testenv.UntilResumed(t, ch, 2*time.Minute)...)
	moved := time.Since(cutAt)
	rest, _ := testenv.Collect(t, ch, 3*time.Minute)
	evs = append(evs, rest...)
	require.Equal(t, n, testenv.CheckOrder(t, evs, 0))
	require.Equal(t, want, testenv.Text(evs), "the moved generation equals an uninterrupted greedy run")
	detected := <-offline
	require.Positive(t, detected, "node Offline within a minute of the cut")
	h := a.waitPool("pa", 2*time.Minute, func(h map[string]any) bool {
		return h["state"] == "Unready" && strings.Contains(fmt.Sprint(h["last_error"]), "NODE_OFFLINE")
	})
	require.True(t, testenv.Alive(oldPID), "the partitioned node's engine runs on: only the node can fence it")
	t.Logf("partition: node Offline %s and stream resumed on the other node %s after the cut; pool %s %v",
		detected.Round(time.Millisecond), moved.Round(time.Millisecond), h["state"], h["last_error"])

	restoredAt := time.Now()
	ns.restore(t)
	online := a.waitNode("part-a", "Online", time.Minute)
	h = a.waitPool("pa", 2*time.Minute, func(h map[string]any) bool {
		return h["state"] == "Ready" && h["epoch"].(float64) > oldEpoch
	})
	ready := time.Since(restoredAt)
	require.True(t, testenv.Alive(wa.cmd.Process.Pid), "the same worker process came back")
	testenv.Eventually(t, 30*time.Second, "stale engine fenced", func() (bool, string) {
		return !testenv.Alive(oldPID), fmt.Sprint(oldPID)
	})
	require.Equal(t, []int{int(h["pid"].(float64))}, testenv.EnginePIDs("pa"), "exactly the pool's engine runs")

	// The stale generation's late events changed nothing; the pool serves.
	_, rec := a.call("GET", "/v2/tasks/"+task1, "")
	require.Equal(t, "Completed", rec["state"], rec)
	require.Equal(t, want, rec["text"])
	// The cluster view follows the node's link again once it is back: a
	// pinned task is refused with a retriable 503 until then, and a client
	// retries it.
	var accepted time.Duration
	testenv.Eventually(t, 30*time.Second, "a task pinned to the recovered pool accepted", func() (bool, string) {
		code, body = a.call("POST", "/v2/tasks", `{"task_id":"`+task2+`","model_ref":"part-model","prompt":"the","max_tokens":16,
			"placement":{"mode":"pin","pin_pool_id":"pa"}}`)
		accepted = time.Since(restoredAt)
		return code == 202 || !(code == 503 && body["retriable"] == true), fmt.Sprint(code, body)
	})
	require.Equal(t, 202, code, body)
	t.Logf("pinned task accepted %s after the link came back", accepted.Round(time.Millisecond))
	testenv.Eventually(t, time.Minute, "task on the recovered pool", func() (bool, string) {
		_, s := a.call("GET", "/v2/tasks/"+task2, "")
		return s["state"] == "Completed", fmt.Sprint(s)
	})
	t.Logf("partition healed: node Online %s and pool Ready on epoch %v %s after the link came back",
		online.Round(time.Millisecond), h["epoch"], ready.Round(time.Millisecond))
	trial.Recovered(ready, fmt.Sprintf("cut: Offline in %.1f s, task resumed elsewhere in %.1f s, completed whole; heal: stale engine fenced, pool Ready on a new epoch",
		detected.Seconds(), moved.Seconds()))
}
