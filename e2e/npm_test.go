package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/llorch/llorch/testenv"
)

// The official OpenAI npm client (the `openai` package `just tools`
// installs into bin/openai-npm) drives /v1 through e2e/npm/openai.cjs:
// models, chat plain and streamed with usage and cached tokens, legacy
// completions, JSON outputs that parse and validate, log probabilities,
// the Responses API, the refusals that name their parameter, and an
// aborted stream.
func TestOpenAINPMClient(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("SKIP (visible on purpose): node is not installed, so the npm client is not tried")
	}
	modules := filepath.Join(testenv.RepoRoot(), "bin", "openai-npm", "node_modules")
	if _, err := os.Stat(filepath.Join(modules, "openai")); err != nil {
		t.Skip("SKIP (visible on purpose): the openai npm package is not in bin/openai-npm: run `just tools`")
	}
	c := newCluster(t)
	id := "e2e-npm"
	w := c.onlineWorker(id)
	c.readyPool(id, "np1", "npm-tiny", 83, `,"slots":2,"ctx":8192`)

	cmd := exec.Command(node, filepath.Join(testenv.RepoRoot(), "e2e", "npm", "openai.cjs"))
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "NODE_PATH=" + modules,
		"OPENAI_BASE_URL=http://" + c.api + "/v1", "OPENAI_API_KEY=" + token, "LLORCH_MODEL=npm-tiny"}
	out, err := cmd.CombinedOutput()
	t.Logf("the npm client's checks:\n%s", out)
	if err != nil {
		t.Fatalf("the npm client's checks failed (%v)", err)
	}
	passed := 0
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "ok ") {
			passed++
		}
	}
	if passed != 14 {
		t.Fatalf("want 14 checks passed, saw %d", passed)
	}
	c.leave(w, id)
}
