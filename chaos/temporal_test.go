package chaos

import (
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// Restart of the Temporal server (file database) with tasks in flight:
// every task still completes, whole; no engine process is left behind.
func TestTemporalRestartWithTasksInFlight(t *testing.T) {
	temporalBin, err := testenv.Tool("temporal")
	require.NoError(t, err)
	dir := t.TempDir()
	tport := port(t)
	args := []string{"server", "start-dev", "--ip", "127.0.0.1", "--port", strconv.Itoa(tport), "--headless",
		"--db-filename", filepath.Join(dir, "temporal.db"),
		"--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off",
		"--log-level", "error", "--namespace", "default"}
	for _, k := range control.SearchAttributes {
		args = append(args, "--search-attribute", k.GetName()+"=Keyword")
	}
	temporal := start(t, "temporal", temporalBin, args...)
	trial := testenv.NewTrial(t, "restart of the Temporal server with tasks in flight")
	taddr := "127.0.0.1:" + strconv.Itoa(tport)

	bin := testenv.Llorch(t)
	common := append([]string{"--temporal-address", taddr, "--home", filepath.Join(dir, "home")}, s3Flags(env.S3.Endpoint)...)
	a := api{t: t, addr: "127.0.0.1:" + strconv.Itoa(port(t))}
	start(t, "apiserver", bin, append([]string{"apiserver", "--addr", a.addr}, common...)...)
	start(t, "worker", bin, append([]string{"worker", "--node-id", "chaos-1", "--metrics-addr", "127.0.0.1:0"}, common...)...)
	t.Cleanup(func() { testenv.KillMentioning(dir) })

	a.waitNode("chaos-1", "Online", 2*time.Minute)
	pushModel(t, a, "chaos-model", modelstore.TinyOptions{Embd: 512, Layers: 8, Context: 4096, Seed: 3})
	a.pool("cp1", "chaos-model", "chaos-1", 2)

	const tasks = 6
	for i := range tasks {
		code, body := a.call("POST", "/v2/tasks", fmt.Sprintf(`{"task_id":"c-%d","model_ref":"chaos-model","prompt":"the","max_tokens":600,"determinism":"strict"}`, i))
		require.Equal(t, 202, code, body)
	}
	testenv.Eventually(t, time.Minute, "tasks running", func() (bool, string) {
		_, s := a.call("GET", "/v2/tasks/c-0", "")
		return s["state"] == "Running", fmt.Sprint(s)
	})
	// Kill the server outright, keep it down a moment, start it again on
	// the same database and port.
	killedAt := time.Now()
	temporal.kill()
	time.Sleep(3 * time.Second) // the outage itself, not a wait for a condition
	temporal.start()

	for i := range tasks {
		var s map[string]any
		testenv.Eventually(t, 5*time.Minute, fmt.Sprintf("task c-%d completed", i), func() (bool, string) {
			_, s = a.call("GET", fmt.Sprintf("/v2/tasks/c-%d", i), "")
			return s["state"] == "Completed" || s["state"] == "Failed", fmt.Sprint(s)
		})
		require.Equal(t, "Completed", s["state"], "task c-%d: %v", i, s)
		require.EqualValues(t, 600, s["tokens_out"])
	}
	t.Logf("temporal restart: %d of %d tasks completed whole, %s after the kill", tasks, tasks, time.Since(killedAt).Round(time.Millisecond))
	trial.Recovered(time.Since(killedAt), fmt.Sprintf("until all %d tasks (600 tokens, 2 slots) completed whole; a 3 s outage", tasks))
	h := a.waitPool("cp1", time.Minute, func(h map[string]any) bool { return h["state"] == "Ready" })
	require.Equal(t, []int{int(h["pid"].(float64))}, testenv.EnginePIDs("cp1"), "exactly the pool's engine runs")
}
