package workflows

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/task"
)

func taskEnv(t *testing.T) (*testsuite.TestWorkflowEnvironment, *scheduler.TaskControl, *activities.GenerateActivities) {
	var ts testsuite.WorkflowTestSuite
	env := ts.NewTestWorkflowEnvironment()
	var tc *scheduler.TaskControl
	var ga *activities.GenerateActivities
	env.RegisterActivity(tc)
	env.RegisterActivity(ga)
	env.OnActivity(tc.TryPlace, mock.Anything, mock.Anything).Return(scheduler.Granted{}, nil)
	env.OnActivity(tc.Release, mock.Anything, mock.Anything).Return(nil)
	env.OnActivity(tc.Finished, mock.Anything, mock.Anything).Return(nil)
	env.RegisterActivity(&activities.QuotaControl{})
	env.SetTestTimeout(30 * time.Second)
	return env, tc, ga
}

var where1 = task.Where{NodeID: "n1", PoolID: "p1", URL: "http://e1", Epoch: 1}

// A node that refuses the slot claim has the task placed again, the same
// pool allowed, with no migration; the wait at the node adds to QueueMs.
func TestTaskPlacedAgainAfterSlotRefused(t *testing.T) {
	env, tc, ga := taskEnv(t)
	env.OnActivity(tc.Place, mock.Anything, mock.Anything).Return(where1, nil)
	calls := 0
	env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(func(context.Context, activities.GenerateInput) (task.Result, error) {
		calls++
		if calls < 3 {
			return task.Result{}, temporal.NewApplicationError("node n1 runs no ready engine of pool p1", task.ErrSlotRefused)
		}
		return task.Result{Tokens: []int32{1}, Pieces: []string{"x"}, StopType: "limit", WaitMs: 1500}, nil
	})
	env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now()})
	require.NoError(t, env.GetWorkflowError())
	var st task.Status
	require.NoError(t, env.GetWorkflowResult(&st))
	require.Equal(t, task.Completed, st.State, st.Error)
	require.Equal(t, 3, calls)
	require.Empty(t, st.Migrations)
	require.GreaterOrEqual(t, st.QueueMs, int64(1500+300), "the backoffs and the node's wait")
}

// Refused every time: the task fails, retriable, after maxRefusals.
func TestTaskGivesUpAfterRefusals(t *testing.T) {
	env, tc, ga := taskEnv(t)
	env.OnActivity(tc.Place, mock.Anything, mock.Anything).Return(where1, nil)
	env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(task.Result{},
		temporal.NewApplicationError("node n1: 4096 generations already wait for pool p1", task.ErrSlotRefused))
	env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now()})
	var st task.Status
	require.NoError(t, env.GetWorkflowResult(&st))
	require.Equal(t, task.Failed, st.State)
	require.Equal(t, task.ErrPoolUnavailable, st.Error.Code)
	require.True(t, st.Error.Retriable)
	require.Contains(t, st.Error.Message, "refused this task's slot 8 times")
	env.AssertNumberOfCalls(t, "Generate", maxRefusals+1)
}

// A generation whose worker outlived its engine hands its tokens over in
// the WORKER_RESET error, and a replica's readers may have seen more (the
// seen signal): the move resumes from the longest, not from an older
// heartbeat.
func TestTaskResumesFromWhatReadersSaw(t *testing.T) {
	env, tc, ga := taskEnv(t)
	where2 := task.Where{NodeID: "n2", PoolID: "p2", URL: "http://e2", Epoch: 1}
	env.OnActivity(tc.StreamProgress, mock.Anything, mock.Anything).Return(task.Progress{}, nil)
	places := 0
	env.OnActivity(tc.Place, mock.Anything, mock.Anything).Return(func(context.Context, scheduler.PlaceInput) (task.Where, error) {
		places++
		if places == 1 {
			return where1, nil
		}
		return where2, nil
	})
	seen := task.Progress{Tokens: []int32{1, 2, 3, 4}, Pieces: []string{"a", "b", "c", "d"}}
	var resumes []int
	env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.GenerateInput) (task.Result, error) {
		resumes = append(resumes, len(in.Resume.Tokens))
		switch len(resumes) {
		case 1:
			env.SignalWorkflow(task.SignalSeen, seen)
			return task.Result{}, temporal.NewApplicationError("engine of p1 broke off", task.ErrWorkerReset,
				task.Progress{Tokens: []int32{1, 2}, Pieces: []string{"a", "b"}})
		default:
			return task.Result{Tokens: append(in.Resume.Tokens, 5), Pieces: append(in.Resume.Pieces, "e"), StopType: "limit"}, nil
		}
	})
	env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now()})
	require.NoError(t, env.GetWorkflowError())
	var st task.Status
	require.NoError(t, env.GetWorkflowResult(&st))
	require.Equal(t, task.Completed, st.State, st.Error)
	require.Equal(t, []int{0, 4}, resumes, "resumed from the 4 tokens readers saw, not the error's 2")
	require.Equal(t, "abcde", st.Text)
	require.Len(t, st.Migrations, 1)
	require.Equal(t, 4, st.Migrations[0].AtToken)
}

// A task admitted under a key's quota tells the key's quota workflow its
// end, with its tokens, whether it completed or was canceled (a signal);
// a task of a key without limits reports its end with a local activity
// (signal-with-start: its key's quota workflow may not exist yet); the
// bootstrap key's tasks, and tasks of no key, send nothing.
func TestTaskReleasesItsQuota(t *testing.T) {
	for _, c := range []struct {
		name, key, owner string
		cancel           bool
		want             *quota.Release
		report           *activities.QuotaReport
	}{
		{"completed", "k1", "k1", false, &quota.Release{TaskID: "t1", TokensIn: 4, TokensOut: 2}, nil},
		{"canceled", "k1", "k1", true, &quota.Release{TaskID: "t1"}, nil},
		{"no limits", "", "k2", false, nil,
			&activities.QuotaReport{KeyID: "k2", Release: quota.Release{TaskID: "t1", TokensIn: 4, TokensOut: 2, Unadmitted: true}}},
		{"no limits, canceled", "", "k2", true, nil,
			&activities.QuotaReport{KeyID: "k2", Release: quota.Release{TaskID: "t1", Unadmitted: true}}},
		{"bootstrap", "", apikey.BootstrapID, false, nil, nil},
		{"no key", "", "", false, nil, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			env, tc, ga := taskEnv(t)
			env.OnActivity(tc.Place, mock.Anything, mock.Anything).Return(where1, nil)
			res := task.Result{Tokens: []int32{1, 2}, Pieces: []string{"a", "b"}, TokensIn: 4, StopType: "limit"}
			gen := env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(res, nil)
			if c.cancel {
				gen.After(time.Hour)
				env.RegisterDelayedCallback(func() { env.SignalWorkflow(task.SignalCancel, "test") }, time.Second)
			}
			var got []quota.Release
			env.OnSignalExternalWorkflow(mock.Anything, quota.WorkflowID("k1"), "", quota.SignalRelease, mock.Anything).Return(
				func(_, _, _, _ string, arg any) error { got = append(got, arg.(quota.Release)); return nil })
			var reports []activities.QuotaReport
			var qa *activities.QuotaControl
			env.OnActivity(qa.ReportUsage, mock.Anything, mock.Anything).Return(func(_ context.Context, r activities.QuotaReport) error {
				reports = append(reports, r)
				return nil
			})
			env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now(), QuotaKey: c.key, Owner: c.owner})
			require.NoError(t, env.GetWorkflowError())
			if c.report != nil {
				require.Equal(t, []activities.QuotaReport{*c.report}, reports)
			} else {
				require.Empty(t, reports)
			}
			if c.want == nil {
				require.Empty(t, got)
				return
			}
			require.Equal(t, []quota.Release{*c.want}, got)
		})
	}
}

// A lost node's heartbeat is a count (task.Progress.Produced): with no
// reader having seen anything the move restarts from the beginning, so
// nothing a client saw changes. A heartbeat recorded before the count
// (every token so far) is still resumed from.
func TestTaskResumeFromHeartbeat(t *testing.T) {
	for name, tc := range map[string]struct {
		details    task.Progress
		wantResume int
	}{
		"count: restart":          {task.Progress{Produced: 3}, 0},
		"old tokens: resume from": {task.Progress{Tokens: []int32{7, 8}, Pieces: []string{"x", "y"}}, 2},
	} {
		t.Run(name, func(t *testing.T) {
			env, ctl, ga := taskEnv(t)
			env.OnActivity(ctl.StreamProgress, mock.Anything, mock.Anything).Return(task.Progress{}, nil)
			where2 := task.Where{NodeID: "n2", PoolID: "p2", URL: "http://e2", Epoch: 1}
			places := 0
			env.OnActivity(ctl.Place, mock.Anything, mock.Anything).Return(func(context.Context, scheduler.PlaceInput) (task.Where, error) {
				if places++; places == 1 {
					return where1, nil
				}
				return where2, nil
			})
			var resumes []int
			env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.GenerateInput) (task.Result, error) {
				resumes = append(resumes, len(in.Resume.Tokens))
				if len(resumes) == 1 {
					return task.Result{}, temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_HEARTBEAT, nil, tc.details)
				}
				return task.Result{Tokens: append(in.Resume.Tokens, 5), Pieces: append(in.Resume.Pieces, "e"), StopType: "limit"}, nil
			})
			env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now()})
			require.NoError(t, env.GetWorkflowError())
			var st task.Status
			require.NoError(t, env.GetWorkflowResult(&st))
			require.Equal(t, task.Completed, st.State, st.Error)
			require.Equal(t, []int{0, tc.wantResume}, resumes)
			require.Len(t, st.Migrations, 1)
			require.Equal(t, tc.wantResume, st.Migrations[0].AtToken)
		})
	}
}

// An output the node stored in the bucket: the task's status (its result
// and its query) holds the reference and the count, not the text.
func TestTaskRecordsOutputReference(t *testing.T) {
	env, tc, ga := taskEnv(t)
	env.OnActivity(tc.Place, mock.Anything, mock.Anything).Return(where1, nil)
	ref := &task.OutputRef{Key: "outputs/t1/5.1.payload", Bytes: 4096, SHA256: "ab", Tokens: 700}
	env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(task.Result{TokensIn: 4, StopType: "limit", Output: ref}, nil)
	env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now()})
	require.NoError(t, env.GetWorkflowError())
	var st task.Status
	require.NoError(t, env.GetWorkflowResult(&st))
	require.Equal(t, task.Completed, st.State, st.Error)
	require.Equal(t, ref, st.Output)
	require.Equal(t, 700, st.TokensOut)
	require.Empty(t, st.Text)
	require.Empty(t, st.Pieces)
	v, err := env.QueryWorkflow(task.QueryStatus)
	require.NoError(t, err)
	var q task.Status
	require.NoError(t, v.Get(&q))
	require.Equal(t, ref, q.Output)
}

// A moved task is placed where a slot holds its prompt (as the lost
// generation's heartbeat told it) and all it may generate; its first
// placement asks nothing of the slot.
func TestTaskMovesToARoomySlot(t *testing.T) {
	env, ctl, ga := taskEnv(t)
	env.OnActivity(ctl.StreamProgress, mock.Anything, mock.Anything).Return(task.Progress{}, nil)
	where2 := task.Where{NodeID: "n2", PoolID: "p2", URL: "http://e2", Epoch: 1}
	var asked []int
	env.OnActivity(ctl.Place, mock.Anything, mock.Anything).Return(func(_ context.Context, in scheduler.PlaceInput) (task.Where, error) {
		asked = append(asked, in.Placement.MinCtx)
		if len(asked) == 1 {
			return where1, nil
		}
		return where2, nil
	})
	calls := 0
	env.OnActivity(ga.Generate, mock.Anything, mock.Anything).Return(func(_ context.Context, in activities.GenerateInput) (task.Result, error) {
		if calls++; calls == 1 {
			return task.Result{}, temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_HEARTBEAT, nil, task.Progress{Produced: 3, TokensIn: 100})
		}
		require.Equal(t, 100, in.Resume.TokensIn, "the resumed generation knows the prompt's length")
		return task.Result{Tokens: []int32{1}, Pieces: []string{"x"}, StopType: "limit", TokensIn: 100}, nil
	})
	env.ExecuteWorkflow(Task, task.Request{TaskID: "t1", ModelID: "m", EnqueuedAt: env.Now(), Params: task.Params{MaxTokens: 50}})
	require.NoError(t, env.GetWorkflowError())
	var st task.Status
	require.NoError(t, env.GetWorkflowResult(&st))
	require.Equal(t, task.Completed, st.State, st.Error)
	require.Equal(t, []int{0, 150}, asked, "the move asks for a slot of prompt + max_tokens")
}
