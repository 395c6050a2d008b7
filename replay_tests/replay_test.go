package replay_tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/workflows"
)

// workflowTypes maps each recorded workflow type to its code; every type
// llorch registers must have at least one history here.
var workflowTypes = map[string]any{
	node.WorkflowType:       workflows.Node,
	model.StageWorkflowType: workflows.Stage,
	model.GCWorkflowType:    workflows.GC,
	pool.WorkflowType:       workflows.Pool,
	task.WorkflowType:       workflows.Task,
	session.WorkflowType:    workflows.Session,
	quota.WorkflowType:      (&workflows.Quotas{}).Quota,
}

func TestReplayRecordedHistories(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	require.NoError(t, err)
	require.NotEmpty(t, files, "no recorded histories: run `just record-histories`")
	covered := map[string]bool{}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".json"), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			require.NoError(t, err)
			h, err := client.HistoryFromJSON(strings.NewReader(string(raw)), client.HistoryJSONOptions{})
			require.NoError(t, err)
			require.NotEmpty(t, h.GetEvents())
			typ := h.GetEvents()[0].GetWorkflowExecutionStartedEventAttributes().GetWorkflowType().GetName()
			fn, ok := workflowTypes[typ]
			require.True(t, ok, "history of unknown workflow type %q", typ)
			covered[typ] = true
			r := worker.NewWorkflowReplayer()
			r.RegisterWorkflowWithOptions(fn, workflow.RegisterOptions{Name: typ})
			require.NoError(t, r.ReplayWorkflowHistory(nil, h))
		})
	}
	for typ := range workflowTypes {
		require.True(t, covered[typ], "workflow type %s has no recorded history", typ)
	}
}
