package workflows

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

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
	env.OnActivity(sc.EnsureStaged, mock.Anything, mock.Anything).Return(model.StageResult{}, nil)
	env.OnActivity(ea.Preflight, mock.Anything, mock.MatchedBy(func(in activities.PreflightInput) bool { return in.Spec.ModelID == "tiny" })).Return(nil)
	env.SetTestTimeout(30 * time.Second)
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
	h := runPool(t, env)
	require.Equal(t, pool.Failed, h.State)
	require.Equal(t, pool.MaxConsecutiveFailures, starts)
	require.Contains(t, h.LastError, "circuit open after 5 consecutive failures")
	require.Contains(t, h.LastError, "bad model")
	// Backoff between the 5 runs: at least 0.5+1+2+4 s of waiting.
	require.GreaterOrEqual(t, env.Now().Sub(begin), 5*2*time.Second+7500*time.Millisecond)
}

// A supervisor that no worker starts (the node died right after the
// engine's readiness) makes the pool Unready NODE_OFFLINE, which does not
// count toward the circuit; the next start waits for the node.
func TestPoolSupervisorNeverStartedIsNodeLost(t *testing.T) {
	env, ea := poolEnv(t)
	starts, supervised := 0, 0
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		starts++
		return pool.Handoff{URL: "http://127.0.0.1:1", PID: 100 + starts, Epoch: in.Epoch, Slots: 2}, nil
	})
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).Return(func(context.Context, activities.SuperviseInput) (activities.SuperviseResult, error) {
		supervised++
		if supervised <= 6 {
			return activities.SuperviseResult{}, temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START, nil)
		}
		return activities.SuperviseResult{}, temporal.NewApplicationError("stop here", "TEST_END")
	})
	var seen pool.Health
	env.RegisterDelayedCallback(func() { seen = health(t, env) }, time.Second)
	runPool(t, env)
	require.Equal(t, pool.Unready, seen.State)
	require.Contains(t, seen.LastError, "NODE_OFFLINE")
	// Six lost supervisors did not open the circuit (5 failures would).
	require.GreaterOrEqual(t, starts, 7)
}

// A start failure (engine never healthy) counts toward the circuit too.
func TestPoolStartFailuresFail(t *testing.T) {
	env, ea := poolEnv(t)
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(pool.Handoff{}, errors.New("engine exited before /health: code 1"))
	h := runPool(t, env)
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
		h := health(t, env)
		require.Equal(t, pool.Ready, h.State)
		require.True(t, h.Ready)
		require.Equal(t, 2, h.SlotsTotal)
		update(t, env, pool.UpdateDrain, pool.DrainRequest{DeadlineMs: 1000}, into(t, &drained))
	}, time.Minute)
	h := runPool(t, env)
	require.Equal(t, pool.Stopped, h.State)
	require.Equal(t, pool.Stopped, drained.State)
	require.Equal(t, 0, h.Restarts)
}

// runPool runs the pool workflow over spec and returns its final health.
func runPool(t *testing.T, env *testsuite.TestWorkflowEnvironment) pool.Health {
	env.ExecuteWorkflow(Pool, pool.Input{Spec: spec})
	var h pool.Health
	require.NoError(t, env.GetWorkflowResult(&h))
	return h
}

// update sends an update and returns its outcome once it completes.
func update(t *testing.T, env *testsuite.TestWorkflowEnvironment, name string, arg any, out func(v any, err error)) {
	env.UpdateWorkflow(name, "", &testsuite.TestUpdateCallback{
		OnReject: func(err error) { out(nil, err) }, OnAccept: func() {}, OnComplete: out,
	}, arg)
}

// into is an update outcome that must succeed; it keeps the result in *v.
func into[T any](t *testing.T, v *T) func(any, error) {
	return func(r any, err error) {
		require.NoError(t, err)
		*v = r.(T)
	}
}

func health(t *testing.T, env *testsuite.TestWorkflowEnvironment) pool.Health {
	v, err := env.QueryWorkflow(pool.QueryHealth)
	require.NoError(t, err)
	var h pool.Health
	require.NoError(t, v.Get(&h))
	return h
}

func drainAt(t *testing.T, env *testsuite.TestWorkflowEnvironment, at time.Duration) {
	env.RegisterDelayedCallback(func() {
		update(t, env, pool.UpdateDrain, pool.DrainRequest{}, func(_ any, err error) { require.NoError(t, err) })
	}, at)
}

func bigModel(env *testsuite.TestWorkflowEnvironment, preflight func() error) {
	var ea *activities.EngineActivities
	env.OnActivity(ea.Preflight, mock.Anything, mock.MatchedBy(func(in activities.PreflightInput) bool { return in.Spec.ModelID == "big" })).Return(
		func(context.Context, activities.PreflightInput) error { return preflight() })
	var ca *activities.CatalogActivities
	env.OnActivity(ca.Entry, mock.Anything, "big").Return(model.Entry{ID: "big", SHA256: strings.Repeat("b", 64), Size: 20, Lifecycle: model.Active}, nil)
}

// Reload with room for both: the new engine starts beside the old one
// (Keep), then the old one's supervisor is cancelled (it stops that epoch).
func TestPoolReloadSideBySide(t *testing.T) {
	env, ea := poolEnv(t)
	bigModel(env, func() error { return nil })
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		return pool.Handoff{URL: "http://e" + in.Spec.ModelID, PID: int(10 + in.Epoch), Epoch: in.Epoch, Slots: 2,
			Model: pool.HandoffModel{ID: in.Spec.ModelID}}, nil
	})
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(time.Hour).Return(activities.SuperviseResult{Reason: "stopped"}, nil)
	var starts []activities.StartInput
	var supervised []int64
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, args converter.EncodedValues) {
		switch info.ActivityType.Name {
		case "StartEngine":
			var in activities.StartInput
			require.NoError(t, args.Get(&in))
			starts = append(starts, in)
		case "Supervise":
			var in activities.SuperviseInput
			require.NoError(t, args.Get(&in))
			supervised = append(supervised, in.Epoch)
		}
	})
	var reply pool.ReloadStatus
	env.RegisterDelayedCallback(func() {
		update(t, env, pool.UpdateReload, pool.ReloadRequest{ModelID: "big"}, into(t, &reply))
	}, time.Minute)
	env.RegisterDelayedCallback(func() {
		h := health(t, env)
		require.Equal(t, pool.Ready, h.State)
		require.Equal(t, "big", h.ModelID)
		require.EqualValues(t, 2, h.Epoch)
		require.Equal(t, "http://ebig", h.URL)
		require.Equal(t, "done", h.Reload.Step)
		require.Equal(t, 0, h.Restarts, "a reload is not a restart")
	}, 2*time.Minute)
	drainAt(t, env, 3*time.Minute)
	h := runPool(t, env)
	require.Equal(t, pool.SideBySide, reply.Mode)
	require.Equal(t, "tiny", reply.FromModel)
	require.Equal(t, "big", reply.ToModel)
	require.Len(t, starts, 2)
	require.EqualValues(t, 1, starts[1].Keep, "the serving engine is kept while the new one starts")
	require.Equal(t, "big", starts[1].Spec.ModelID)
	require.Equal(t, []int64{1, 2}, supervised, "epoch 1 supervised until the switch, then epoch 2")
	require.Equal(t, pool.Stopped, h.State)
}

// A new engine that fails to start leaves the old one serving.
func TestPoolReloadFailureKeepsOldEngine(t *testing.T) {
	env, ea := poolEnv(t)
	bigModel(env, func() error { return nil })
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		if in.Spec.ModelID == "big" {
			return pool.Handoff{}, temporal.NewNonRetryableApplicationError("engine exited with code 1 while loading", pool.ErrEngineStart, nil)
		}
		return pool.Handoff{URL: "http://old", PID: 7, Epoch: in.Epoch, Slots: 2}, nil
	})
	supervises := 0
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(time.Hour).Return(activities.SuperviseResult{Reason: "stopped"}, nil)
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		if info.ActivityType.Name == "Supervise" {
			supervises++
		}
	})
	env.RegisterDelayedCallback(func() {
		update(t, env, pool.UpdateReload, pool.ReloadRequest{ModelID: "big"}, func(v any, err error) {
			require.NoError(t, err)
			require.Equal(t, pool.SideBySide, v.(pool.ReloadStatus).Mode)
		})
	}, time.Minute)
	env.RegisterDelayedCallback(func() {
		h := health(t, env)
		require.Equal(t, pool.Ready, h.State)
		require.Equal(t, "tiny", h.ModelID)
		require.EqualValues(t, 1, h.Epoch)
		require.Equal(t, "http://old", h.URL)
		require.Equal(t, "failed", h.Reload.Step)
		require.Contains(t, h.Reload.Error, "the old engine keeps serving")
		// A second reload may follow a failed one.
		update(t, env, pool.UpdateReload, pool.ReloadRequest{ModelID: "../x"}, func(_ any, err error) {
			require.ErrorContains(t, err, "invalid")
		})
	}, 2*time.Minute)
	drainAt(t, env, 3*time.Minute)
	h := runPool(t, env)
	require.Equal(t, pool.Stopped, h.State)
	require.Equal(t, 1, supervises, "the old engine was supervised throughout")
}

// No room for both: the old engine is drained and stopped before the new
// one starts, and the reply says so.
func TestPoolReloadDrainsFirstWithoutRoom(t *testing.T) {
	env, ea := poolEnv(t)
	preflights := 0
	bigModel(env, func() error {
		preflights++
		if preflights == 1 {
			return temporal.NewNonRetryableApplicationError("needs 9 GiB, 5 free", pool.ErrInsufficientVRAM, nil)
		}
		return nil
	})
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		require.Zero(t, in.Keep, "nothing is kept when draining first")
		return pool.Handoff{URL: "http://e" + in.Spec.ModelID, PID: int(in.Epoch), Epoch: in.Epoch, Slots: 2}, nil
	})
	env.OnActivity(ea.DrainEngine, mock.Anything, mock.Anything).Return(activities.DrainResult{Idle: true}, nil)
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(time.Hour).Return(activities.SuperviseResult{Reason: "stopped"}, nil)
	var reply pool.ReloadStatus
	env.RegisterDelayedCallback(func() {
		update(t, env, pool.UpdateReload, pool.ReloadRequest{ModelID: "big", DeadlineMs: 5000}, into(t, &reply))
	}, time.Minute)
	drainAt(t, env, 3*time.Minute)
	h := runPool(t, env)
	require.Equal(t, pool.DrainFirst, reply.Mode)
	require.Equal(t, "big", h.ModelID)
	require.Equal(t, "done", h.Reload.Step)
	require.EqualValues(t, 2, h.Epoch)
	require.Equal(t, 2, preflights)
}

// A restarted worker reports the engine it found: the serving epoch is
// adopted (supervised again, not restarted); any other epoch is refused,
// and the node fences it.
func TestPoolAdoptsServingEpochOnly(t *testing.T) {
	env, ea := poolEnv(t)
	starts := 0
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		starts++
		return pool.Handoff{URL: "http://e", PID: 7, Epoch: in.Epoch, Slots: 2}, nil
	})
	var supervised []int
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(time.Hour).Return(activities.SuperviseResult{Reason: "stopped"}, nil)
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, args converter.EncodedValues) {
		if info.ActivityType.Name == "Supervise" {
			var in activities.SuperviseInput
			require.NoError(t, args.Get(&in))
			supervised = append(supervised, in.PID)
		}
	})
	var stale, adopted pool.HandoffReply
	env.RegisterDelayedCallback(func() {
		update(t, env, pool.UpdateHandoff, pool.HandoffEvent{Adopt: true, Handoff: pool.Handoff{Epoch: 9, PID: 99}}, into(t, &stale))
		update(t, env, pool.UpdateHandoff, pool.HandoffEvent{Adopt: true, Handoff: pool.Handoff{Epoch: 1, PID: 8, URL: "http://adopted", Slots: 2}}, into(t, &adopted))
	}, time.Minute)
	env.RegisterDelayedCallback(func() {
		h := health(t, env)
		require.Equal(t, pool.Ready, h.State)
		require.Equal(t, "http://adopted", h.URL)
		require.Equal(t, 8, h.PID)
		require.EqualValues(t, 1, h.Epoch)
	}, 2*time.Minute)
	drainAt(t, env, 3*time.Minute)
	env.ExecuteWorkflow(Pool, pool.Input{Spec: spec})
	require.NoError(t, env.GetWorkflowError())
	require.False(t, stale.Accept)
	require.Contains(t, stale.Reason, "not the serving epoch")
	require.True(t, adopted.Accept)
	require.Equal(t, 1, starts, "adopted, not restarted")
	require.Equal(t, []int{7, 8}, supervised)
}

// Restarts grow the history; past the limit the pool continues as new with
// its epoch, restarts and failure budget.
func TestPoolContinuesAsNew(t *testing.T) {
	env, ea := poolEnv(t)
	env.OnActivity(ea.StartEngine, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.StartInput) (pool.Handoff, error) {
		return pool.Handoff{URL: "http://e", PID: int(in.Epoch), Epoch: in.Epoch, Slots: 2}, nil
	})
	// Each run is stable long enough to reset the circuit, then exits.
	env.OnActivity(ea.Supervise, mock.Anything, mock.Anything).After(pool.StableAfter).Return(
		activities.SuperviseResult{Exited: true, ExitCode: 1, Reason: "engine exited with code 1", UptimeMs: pool.StableAfter.Milliseconds()}, nil)
	// The test environment keeps no history length: Temporal's suggestion
	// stands in for it (the e2e test crosses the event limit on a real server).
	env.SetContinueAsNewSuggested(true)
	env.ExecuteWorkflow(Pool, pool.Input{Spec: spec, ContinueAsNewEvents: 60})
	err := env.GetWorkflowError()
	var can *workflow.ContinueAsNewError
	require.ErrorAs(t, err, &can)
	var next pool.Input
	require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(can.Input, &next))
	require.NotNil(t, next.Carry)
	require.Equal(t, 60, next.ContinueAsNewEvents)
	require.Positive(t, next.Carry.Health.Restarts)
	require.Equal(t, next.Carry.Health.Epoch, next.Carry.LastEpoch)
	require.Equal(t, "tiny", next.Carry.Entry.ID)
	require.Equal(t, pool.Unready, next.Carry.Health.State)
}
