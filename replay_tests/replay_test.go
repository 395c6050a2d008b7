package replay_tests

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/converter"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/codec"
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
	node.WorkflowType:           workflows.Node,
	model.StageWorkflowType:     workflows.Stage,
	model.GCWorkflowType:        workflows.GC,
	pool.WorkflowType:           workflows.Pool,
	task.WorkflowType:           workflows.Task,
	session.WorkflowType:        workflows.Session,
	apikey.RegistryWorkflowType: workflows.Keys,
	quota.WorkflowType:          (&workflows.Quotas{}).Quota,
}

func TestReplayRecordedHistories(t *testing.T) { replayAll(t, nil) }

// With the payload codec in place every recorded history replays twice:
// as recorded (plaintext: histories from before the codec, which its
// decoder passes through) and with every payload encrypted, as a history
// recorded with the codec on holds them.
func TestReplayRecordedHistoriesWithCodec(t *testing.T) {
	c, err := codec.Parse(codec.NewKey("replay"))
	require.NoError(t, err)
	for name, encrypt := range map[string]bool{"plaintext": false, "encrypted": true} {
		t.Run(name, func(t *testing.T) {
			replayAll(t, func(t *testing.T, h *historypb.History) converter.DataConverter {
				if encrypt {
					require.NoError(t, c.EncodeMessage(context.Background(), h))
					p := h.GetEvents()[0].GetWorkflowExecutionStartedEventAttributes().GetInput().GetPayloads()
					if len(p) > 0 {
						require.Equal(t, codec.MetadataEncodingEncrypted, string(p[0].GetMetadata()["encoding"]))
					}
				}
				return codec.DataConverter(c)
			})
		})
	}
}

// replayAll replays every recorded history; with dc, through the data
// converter it returns for each history (which it may rewrite first).
func replayAll(t *testing.T, dc func(*testing.T, *historypb.History) converter.DataConverter) {
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
			var opts worker.WorkflowReplayerOptions
			if dc != nil {
				opts.DataConverter = dc(t, h)
			}
			r, err := worker.NewWorkflowReplayerWithOptions(opts)
			require.NoError(t, err)
			r.RegisterWorkflowWithOptions(fn, workflow.RegisterOptions{Name: typ})
			require.NoError(t, r.ReplayWorkflowHistory(nil, h))
		})
	}
	for typ := range workflowTypes {
		require.True(t, covered[typ], "workflow type %s has no recorded history", typ)
	}
}
