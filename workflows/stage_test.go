package workflows

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

var entry = model.Entry{ID: "tiny", Key: "models/tiny.gguf", SHA256: strings.Repeat("ab", 32), Size: 1000}

func stageEnv() (*testsuite.TestWorkflowEnvironment, *activities.StagingActivities) {
	var ts testsuite.WorkflowTestSuite
	env := ts.NewTestWorkflowEnvironment()
	var sa *activities.StagingActivities
	env.RegisterActivity(sa)
	return env, sa
}

func TestStageReportsProgressAndResult(t *testing.T) {
	env, sa := stageEnv()
	env.OnActivity(sa.StageModel, mock.Anything, mock.MatchedBy(func(in activities.StageInput) bool {
		return in.NodeID == "n1" && in.Entry.SHA256 == entry.SHA256 && in.WorkflowID != ""
	})).After(10*time.Second).Return(model.StageResult{SHA256: entry.SHA256, Size: 1000, BytesTransferred: 1000}, nil)
	env.RegisterDelayedCallback(func() {
		env.SignalWorkflow(model.SignalStageProgress, model.StageProgressSignal{BytesDone: 400, BytesTotal: 1000, Percent: 40})
	}, 2*time.Second)
	env.RegisterDelayedCallback(func() {
		v, err := env.QueryWorkflow(model.QueryStageProgress)
		require.NoError(t, err)
		var st model.StageStatus
		require.NoError(t, v.Get(&st))
		require.Equal(t, "downloading", st.Phase)
		require.Equal(t, 40, st.Percent)
		require.EqualValues(t, 400, st.BytesDone)
	}, 3*time.Second)
	env.ExecuteWorkflow(Stage, model.StageRequest{NodeID: "n1", Entry: entry})
	require.NoError(t, env.GetWorkflowError())
	var res model.StageResult
	require.NoError(t, env.GetWorkflowResult(&res))
	require.EqualValues(t, 1000, res.BytesTransferred)
}

// A checksum mismatch is final: no retry, the workflow fails with its type.
func TestStageChecksumMismatchIsNotRetried(t *testing.T) {
	env, sa := stageEnv()
	calls := 0
	env.OnActivity(sa.StageModel, mock.Anything, mock.Anything).Return(func(context.Context, activities.StageInput) (model.StageResult, error) {
		calls++
		return model.StageResult{}, temporal.NewNonRetryableApplicationError("expected ab.., got cd..", model.ErrChecksumMismatch, nil)
	})
	env.ExecuteWorkflow(Stage, model.StageRequest{NodeID: "n1", Entry: entry})
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(env.GetWorkflowError(), &appErr))
	require.Equal(t, model.ErrChecksumMismatch, appErr.Type())
	require.Equal(t, 1, calls)
}

// A worker lost mid-download (heartbeat timeout) is retried until it works.
func TestStageRetriesAfterHeartbeatTimeout(t *testing.T) {
	env, sa := stageEnv()
	calls := 0
	env.OnActivity(sa.StageModel, mock.Anything, mock.Anything).Return(func(context.Context, activities.StageInput) (model.StageResult, error) {
		calls++
		if calls < 3 {
			return model.StageResult{}, temporal.NewApplicationError("read: connection reset", "IO")
		}
		return model.StageResult{SHA256: entry.SHA256}, nil
	})
	env.ExecuteWorkflow(Stage, model.StageRequest{NodeID: "n1", Entry: entry})
	require.NoError(t, env.GetWorkflowError())
	require.Equal(t, 3, calls)
}

func TestGCDryRunDeletesNothingAndRealRunSkipsInUse(t *testing.T) {
	plan := model.GCPlan{Evictions: []model.Eviction{
		{Kind: "model", SHA256: strings.Repeat("a", 64), ModelID: "old", Reason: "lru", Bytes: 10},
		{Kind: "model", SHA256: strings.Repeat("b", 64), ModelID: "busy", Reason: "lru", Bytes: 20},
	}}
	run := func(dry bool) (model.GCResult, int) {
		var ts testsuite.WorkflowTestSuite
		env := ts.NewTestWorkflowEnvironment()
		var ga *activities.GCActivities
		var ca *activities.CatalogActivities
		env.RegisterActivity(ga)
		env.RegisterActivity(ca)
		env.OnActivity(ca.Digests, mock.Anything).Return(activities.CatalogDigests{Known: true}, nil)
		env.OnActivity(ga.PlanGC, mock.Anything, mock.MatchedBy(func(in activities.PlanGCInput) bool {
			return in.NodeID == "n1" && in.Catalog.Known && in.Policy.HighWatermark == 0.9
		})).Return(plan, nil)
		evicts := 0
		env.OnActivity(ga.Evict, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.EvictInput) error {
			evicts++
			if in.Eviction.ModelID == "busy" {
				return temporal.NewNonRetryableApplicationError("in use", model.ErrInUse, nil)
			}
			return nil
		})
		env.ExecuteWorkflow(GC, model.GCInput{NodeID: "n1", DryRun: dry, Policy: node.GCPolicy{HighWatermark: 0.9, LowWatermark: 0.5}})
		require.NoError(t, env.GetWorkflowError())
		var res model.GCResult
		require.NoError(t, env.GetWorkflowResult(&res))
		return res, evicts
	}
	res, evicts := run(true)
	require.Equal(t, 0, evicts)
	require.Len(t, res.Plan.Evictions, 2)
	require.Empty(t, res.Evicted)
	res, evicts = run(false)
	require.Equal(t, 2, evicts)
	require.Len(t, res.Evicted, 1, "the in-use model is skipped, GC goes on")
	require.Equal(t, "old", res.Evicted[0].ModelID)
}
