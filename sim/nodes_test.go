package sim_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/sim"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/workers"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

// serveControl runs the node workflows, as the apiserver does.
func serveControl(t *testing.T) {
	w := workers.NewControl(env.Temporal, nil, nil)
	require.NoError(t, w.Start())
	t.Cleanup(w.Stop)
}

// fleetStates lists the nodes named <prefix>-N through the control plane's
// own reader, by state.
func fleetStates(t *testing.T, prefix string) (map[node.State]int, []control.NodeView) {
	nodes := &control.Nodes{Temporal: env.Temporal, Namespace: env.Namespace, DataConverter: env.DataConverter()}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	views, err := nodes.List(ctx)
	require.NoError(t, err)
	states := map[node.State]int{}
	var mine []control.NodeView
	for _, v := range views {
		if strings.HasPrefix(v.NodeID, prefix+"-") {
			states[v.State]++
			mine = append(mine, v)
		}
	}
	return states, mine
}

func waitAll(t *testing.T, prefix string, count int, want node.State) []control.NodeView {
	t.Helper()
	var views []control.NodeView
	testenv.Eventually(t, time.Minute, fmt.Sprintf("%d nodes %s", count, want), func() (bool, string) {
		var states map[node.State]int
		states, views = fleetStates(t, prefix)
		return states[want] == count && len(views) == count, fmt.Sprint(states)
	})
	return views
}

func TestFleetOnlineThenLeft(t *testing.T) {
	serveControl(t)
	const count = 20
	quiet := slog.New(slog.DiscardHandler)
	f, err := sim.New(sim.Options{Temporal: env.Temporal, DataConverter: env.DataConverter(), Namespace: env.Namespace, Prefix: "fleet", Count: count,
		HeartbeatInterval: time.Second, StartRate: 200, NVMLMock: "dgxh100", Dir: t.TempDir(), Log: quiet, NodeLog: quiet})
	require.NoError(t, err)
	f.Start()
	views := waitAll(t, "fleet", count, node.Online)
	require.Equal(t, count, f.Registered())
	for _, v := range views {
		require.Equal(t, node.AgentWorker, v.Agent, v.NodeID)
		require.Len(t, v.Inventory.GPUs, 8, "%s simulates a DGX H100", v.NodeID)
		require.Equal(t, v.NodeID, v.Inventory.MachineID)
	}
	// The live figures come from the liveness heartbeats.
	testenv.Eventually(t, 30*time.Second, "every node's heartbeat read back", func() (bool, string) {
		_, views := fleetStates(t, "fleet")
		for _, v := range views {
			if v.Live == nil || len(v.Live.GPUs) != 8 {
				return false, v.NodeID + " has no live snapshot yet"
			}
		}
		return true, ""
	})

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, f.Stop(ctx))
	waitAll(t, "fleet", count, node.Left)
}

func TestOptionsRefused(t *testing.T) {
	base := sim.Options{Temporal: env.Temporal, Prefix: "ok", Count: 2, HeartbeatInterval: time.Second,
		StartRate: 1, Dir: t.TempDir()}
	for name, tc := range map[string]struct {
		change func(*sim.Options)
		want   string
	}{
		"no nodes":       {func(o *sim.Options) { o.Count = 0 }, "--count 0"},
		"bad prefix":     {func(o *sim.Options) { o.Prefix = "Bad Prefix" }, `--prefix "Bad Prefix"`},
		"unknown mock":   {func(o *sim.Options) { o.NVMLMock = "dgx-nope" }, "--nvml-mock"},
		"no start rate":  {func(o *sim.Options) { o.StartRate = 0 }, "--start-rate"},
		"slow heartbeat": {func(o *sim.Options) { o.HeartbeatInterval = time.Hour }, "--heartbeat-interval"},
	} {
		t.Run(name, func(t *testing.T) {
			o := base
			tc.change(&o)
			_, err := sim.New(o)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// The command: CPU-only nodes Online, the agents' metrics served, and
// SIGTERM deregisters every node before the process exits 0.
func TestSimNodesCommand(t *testing.T) {
	serveControl(t)
	const count = 5
	port, err := testenv.FreePort()
	require.NoError(t, err)
	metrics := fmt.Sprintf("http://127.0.0.1:%d", port)
	cmd := exec.Command(testenv.Llorch(t), "sim", "nodes", "--count", fmt.Sprint(count), "--prefix", "cmd", "--nvml-mock", "",
		"--temporal-address", env.TemporalAddr, "--home", t.TempDir(), "--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port))
	out := &testenv.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), codec.EnvKeys + "=" + env.CodecKeys}
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("llorch sim nodes output:\n%s", out.String())
		}
	})

	views := waitAll(t, "cmd", count, node.Online)
	for _, v := range views {
		require.True(t, v.Inventory.CPUOnly, "%s is CPU-only", v.NodeID)
	}
	res, err := http.Get(metrics + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Contains(t, string(body), `llorch_node_heartbeats_total{node_id="cmd-4"}`)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-done:
		require.NoError(t, err, out.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("llorch sim nodes still running 30 s after SIGTERM:\n%s", out.String())
	}
	states, _ := fleetStates(t, "cmd")
	require.Equal(t, map[node.State]int{node.Left: count}, states, "every node deregistered before the exit")
	require.Contains(t, out.String(), "simulated nodes stopped")
}
