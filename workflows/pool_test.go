package workflows

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/pool"
)

func poolEnv(t *testing.T) (*testsuite.TestWorkflowEnvironment, *activities.EngineActivities) {
	var ts testsuite.WorkflowTestSuite
	env := ts.NewTestWorkflowEnvironment()
	var ca *activities.CatalogActivities
	var sc *activities.StagingControl
	var ea *activities.EngineActivities
	env.RegisterActivity(ca)
	env.RegisterActivity(sc)
	env.RegisterActivity(ea)
	env.OnActivity(ca.Entry, mock.Anything, "tiny").Return(model.Entry{ID: "tiny", SHA256: strings.Repeat("c", 64), Size: 10, Lifecycle: model.Active}, nil)
	env.OnActivity(sc.EnsureStaged, mock.Anything, mock.Anything).Return(activities.StageResult{}, nil)
	env.OnActivity(ea.Preflight, mock.Anything, mock.Anything).Return(nil)
	return env, ea
}

var spec = pool.Spec{PoolID: "p1", NodeID: "n1", ModelID: "tiny", Engine: pool.Builtin, Slots: 2}

// An engine that keeps dying opens the circuit after MaxConsecutiveFailures
// restarts with growing backoff: the pool ends Failed with the last reason.
func TestPoolCircuitOpensAfterRepeatedFailures(t *testing.T) {
	env, ea := poolEnv(t)
	starts := 0
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		starts++
		return pool.Handoff{URL: "http://127.0.0.1:1", PID: 100 + starts, Epoch: in.Epoch, Slots: 2}, nil
	})
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(2*time.Second).
		Return(activities.SuperviseResult{Exited: true, ExitCode: 1, Reason: "engine exited with code 1", LogTail: "bad model", UptimeMs: 2000}, nil)
	begin := env.Now()
	env.ExecuteWorkflow(Pool, PoolInput{Spec: spec})
	require.NoError(t, env.GetWorkflowError())
	var h pool.Health
	require.NoError(t, env.GetWorkflowResult(&h))
	require.Equal(t, pool.Failed, h.State)
	require.Equal(t, pool.MaxConsecutiveFailures, starts)
	require.Contains(t, h.LastError, "circuit open after 5 consecutive failures")
	require.Contains(t, h.LastError, "bad model")
	// Backoff between the 5 runs: at least 0.5+1+2+4 s of waiting.
	require.GreaterOrEqual(t, env.Now().Sub(begin), 5*2*time.Second+7500*time.Millisecond)
}

// A start failure (engine never healthy) counts toward the circuit too.
func TestPoolStartFailuresFail(t *testing.T) {
	env, ea := poolEnv(t)
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(pool.Handoff{}, errors.New("engine exited before /health: code 1"))
	env.ExecuteWorkflow(Pool, PoolInput{Spec: spec})
	var h pool.Health
	require.NoError(t, env.GetWorkflowResult(&h))
	require.Equal(t, pool.Failed, h.State)
	require.Equal(t, 4, h.Restarts)
}

// Drain while Ready: the supervisor is cancelled (it stops the engine) and
// the pool ends Stopped; the drain update answers with that state.
func TestPoolDrain(t *testing.T) {
	env, ea := poolEnv(t)
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(pool.Handoff{URL: "http://127.0.0.1:1", PID: 7, Epoch: 1, Slots: 2}, nil)
	env.OnActivity(ea.DrainEngine, mock.Anything, mock.MatchedBy(func(in activities.DrainInput) bool {
		return in.Deadline == time.Second && in.URL == "http://127.0.0.1:1"
	})).After(300*time.Millisecond).Return(activities.DrainResult{Idle: true, WaitedMs: 300}, nil)
	// A supervisor that would run for an hour; the drain cancels it.
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(time.Hour).Return(activities.SuperviseResult{Reason: "stopped"}, nil)
	var drained pool.Health
	env.RegisterDelayedCallback(func() {
		v, err := env.QueryWorkflow(pool.QueryHealth)
		require.NoError(t, err)
		var h pool.Health
		require.NoError(t, v.Get(&h))
		require.Equal(t, pool.Ready, h.State)
		require.True(t, h.Ready)
		require.Equal(t, 2, h.SlotsTotal)
		env.UpdateWorkflow(pool.UpdateDrain, "", &testsuite.TestUpdateCallback{
			OnReject: func(err error) { t.Error(err) }, OnAccept: func() {},
			OnComplete: func(v any, err error) { require.NoError(t, err); drained = v.(pool.Health) },
		}, pool.DrainRequest{DeadlineMs: 1000})
	}, time.Minute)
	env.ExecuteWorkflow(Pool, PoolInput{Spec: spec})
	var h pool.Health
	require.NoError(t, env.GetWorkflowResult(&h))
	require.Equal(t, pool.Stopped, h.State)
	require.Equal(t, pool.Stopped, drained.State)
	require.Equal(t, 0, h.Restarts)
}
