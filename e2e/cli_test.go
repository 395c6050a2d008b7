package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
)

// The resource commands against a running cluster: a pool made with
// `pools create`, the nodes and pools listed and shown, a task submitted
// with its tokens streamed to stdout (the greedy text), one detached then
// read and canceled, one interrupted with Ctrl-C (the task is canceled),
// a node drained and undrained, errors with the API's code.
func TestResourcesCLI(t *testing.T) {
	c := newCluster(t)
	bin := testenv.Llorch(t)
	id := "e2e-cli"
	w := c.onlineWorker(id)
	command := func(args ...string) *exec.Cmd {
		cmd := exec.Command(bin, append(args, "--home", c.home)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
			"LLORCH_API_URL=http://" + c.api, "LLORCH_API_TOKEN=" + token}
		return cmd
	}
	run := func(args ...string) (string, string, error) {
		var out, errOut bytes.Buffer
		cmd := command(args...)
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		return out.String(), errOut.String(), err
	}
	must := func(args ...string) string {
		out, errOut, err := run(args...)
		require.NoError(t, err, "llorch %v: %s%s", args, out, errOut)
		return out
	}

	path, _, _ := tinyModel(t, modelstore.TinyOptions{Seed: 91})
	c.push("cli-tiny", path)
	out := must("pools", "create", "--node", id, "--model", "cli-tiny", "--id", "cp1", "--slots", "2", "--ctx", "8192")
	require.Contains(t, out, "pool cp1 starting on node "+id)
	h := c.waitPool("cp1", pool.Ready, 90*time.Second)

	out = must("nodes", "ls")
	require.Regexp(t, `(?m)^NODE\s+STATE`, out)
	require.Regexp(t, `(?m)^`+id+`\s+Online\s`, out)
	var n map[string]any
	require.NoError(t, json.Unmarshal([]byte(must("nodes", "get", id, "--json")), &n))
	require.Equal(t, id, n["node_id"])
	require.Regexp(t, `(?m)^cp1\s+`+id+`\s+cli-tiny\s+Ready\s+builtin\s+2\s`, must("pools", "ls"))
	require.Regexp(t, `(?m)^state:\s+Ready$`, must("pools", "health", "cp1"))

	// Streamed: the tokens are stdout, the end is stderr.
	out, errOut, err := run("tasks", "submit", "--model", "cli-tiny", "--max-tokens", "12", "--temperature", "0", "Once upon a time")
	require.NoError(t, err, errOut)
	require.Equal(t, greedy(t, h["url"].(string), "Once upon a time", 12)+"\n", out)
	require.Contains(t, errOut, "end: 12 tokens, stop limit")

	// The same long prompt again reuses the slot that holds it; a kv_hint
	// the API does not know is refused naming it.
	repeated := strings.Repeat("the cat sat on the mat. ", 30)
	_, errOut, err = run("tasks", "submit", "--model", "cli-tiny", "--max-tokens", "4", "--kv-hint", "reuse", repeated)
	require.NoError(t, err, errOut)
	_, errOut, err = run("tasks", "submit", "--model", "cli-tiny", "--max-tokens", "4", repeated)
	require.NoError(t, err, errOut)
	m := regexp.MustCompile(`prompt (\d+) tokens, (\d+) from a slot's cache`).FindStringSubmatch(errOut)
	require.NotNil(t, m, errOut)
	require.NotEqual(t, "0", m[2], "the second run reuses the first one's cache: %s", errOut)
	_, errOut, err = run("tasks", "submit", "--model", "cli-tiny", "--kv-hint", "warm", "x")
	require.Error(t, err)
	require.Contains(t, errOut, "kv_hint")

	// Detached, read back, canceled (idempotent on an ended task: 409).
	taskID := strings.TrimSpace(must("tasks", "submit", "--model", "cli-tiny", "--max-tokens", "4", "--detach", "hello"))
	require.True(t, strings.HasPrefix(taskID, "t-"), taskID)
	testenv.Eventually(t, 60*time.Second, "the detached task completed", func() (bool, string) {
		var st map[string]any
		_ = json.Unmarshal([]byte(must("tasks", "get", taskID, "--json")), &st)
		return st["state"] == "Completed", fmt.Sprint(st)
	})
	require.Regexp(t, `(?m)^state:\s+Completed$`, must("tasks", "get", taskID))
	recordHistory(t, "task:"+taskID, "task-completed-indexed")
	_, errOut, err = run("tasks", "cancel", taskID)
	require.Error(t, err)
	require.Contains(t, errOut, "TASK_ENDED")

	// Ctrl-C while tokens stream: the command exits 130, the task is canceled.
	var streamed bytes.Buffer
	long := command("tasks", "submit", "--model", "cli-tiny", "--max-tokens", "3500", "go on")
	pr, pw, err := os.Pipe()
	require.NoError(t, err)
	long.Stdout, long.Stderr = pw, &streamed
	require.NoError(t, long.Start())
	pw.Close()
	first := make([]byte, 1)
	_, err = pr.Read(first)
	require.NoError(t, err, "the first token: %s", streamed.String())
	require.NoError(t, long.Process.Signal(syscall.SIGINT))
	go func() { _, _ = bytes.NewBuffer(nil).ReadFrom(pr) }()
	err = long.Wait()
	var exit *exec.ExitError
	require.True(t, errors.As(err, &exit), "%v: %s", err, streamed.String())
	require.Equal(t, 130, exit.ExitCode(), streamed.String())
	canceled := strings.TrimPrefix(strings.Split(streamed.String(), "\n")[0], "task ")
	require.Contains(t, streamed.String(), "task "+canceled+" canceled")
	testenv.Eventually(t, 60*time.Second, "the interrupted task canceled", func() (bool, string) {
		_, rec := c.get("/v2/tasks/" + canceled)
		return rec["state"] == "Canceled", fmt.Sprint(rec)
	})

	// Lists by end state, model and time, a page at a time; the states
	// come from the TaskState the workflows recorded.
	testenv.Eventually(t, 30*time.Second, "the ended tasks listed by state", func() (bool, string) {
		done, gone := must("tasks", "ls", "--state", "completed", "--model", "cli-tiny"), must("tasks", "ls", "--state", "canceled")
		return strings.Contains(done, taskID) && strings.Contains(gone, canceled) && !strings.Contains(done, canceled), done + gone
	})
	recordHistory(t, "task:"+canceled, "task-canceled-indexed") // closed: its TaskState is in
	var page struct {
		Tasks []struct {
			TaskID string `json:"task_id"`
		} `json:"tasks"`
		Next *string `json:"next_page_token"`
	}
	require.NoError(t, json.Unmarshal([]byte(must("tasks", "ls", "--model", "cli-tiny", "--page-size", "1", "--json")), &page))
	require.Len(t, page.Tasks, 1)
	require.NotNil(t, page.Next, "five tasks, pages of one")
	seen := map[string]bool{page.Tasks[0].TaskID: true}
	for page.Next != nil {
		tok := *page.Next
		page.Next = nil
		require.NoError(t, json.Unmarshal([]byte(must("tasks", "ls", "--model", "cli-tiny", "--page-size", "1", "--page-token", tok, "--json")), &page))
		for _, x := range page.Tasks {
			seen[x.TaskID] = true
		}
	}
	require.Len(t, seen, 5, "every task once, over the pages")
	require.Contains(t, must("tasks", "ls", "--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)), "TASK", "a header, no rows")
	_, errOut, err = run("tasks", "ls", "--state", "lost")
	require.Error(t, err)
	require.Contains(t, errOut, "state")

	must("nodes", "drain", id)
	_, body := c.get("/v2/nodes/" + id)
	require.Equal(t, true, body["draining"], body)
	must("nodes", "undrain", id)
	_, body = c.get("/v2/nodes/" + id)
	require.Equal(t, false, body["draining"], body)

	_, errOut, err = run("tasks", "get", "t-ghost")
	require.Error(t, err)
	require.Contains(t, errOut, "TASK_NOT_FOUND")
	_, errOut, err = run("pools", "create", "--node", id)
	require.Error(t, err)
	require.Contains(t, errOut, "--model")

	must("pools", "drain", "cp1")
	c.waitPool("cp1", pool.Stopped, 60*time.Second)
	c.leave(w, id)
}
