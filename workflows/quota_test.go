package workflows

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/quota"
)

// quotaEnv runs quota workflows; their sweep finds every task running
// unless running says otherwise.
func quotaEnv(q *Quotas, running ...func([]string) []string) *testsuite.TestWorkflowEnvironment {
	env := sessionEnv()
	env.RegisterWorkflowWithOptions(q.Quota, workflow.RegisterOptions{Name: quota.WorkflowType})
	var qa *activities.QuotaControl
	env.RegisterActivity(qa)
	env.OnActivity(qa.RunningTasks, mock.Anything, mock.Anything).Return(func(_ context.Context, ids []string) ([]string, error) {
		if len(running) > 0 {
			return running[0](ids), nil
		}
		return ids, nil
	})
	return env
}

func admitAt(env *testsuite.TestWorkflowEnvironment, d time.Duration, taskID string, l apikey.Limits, out func(quota.AdmitResult, error)) {
	sessionUpdate(env, d, quota.UpdateAdmit, quota.AdmitRequest{TaskID: taskID, Limits: l}, func(r any, err error) {
		var res quota.AdmitResult
		if r != nil {
			res = r.(quota.AdmitResult)
		}
		out(res, err)
	})
}

func refusalOf(t *testing.T, err error) quota.Refusal {
	t.Helper()
	var app *temporal.ApplicationError
	require.True(t, errors.As(err, &app), "want a refusal, got %v", err)
	require.Equal(t, quota.ErrExceeded, app.Type())
	var r quota.Refusal
	require.NoError(t, app.Details(&r))
	return r
}

func quotaState(t *testing.T, env *testsuite.TestWorkflowEnvironment) quota.State {
	v, err := env.QueryWorkflow(quota.QueryState)
	require.NoError(t, err)
	var st quota.State
	require.NoError(t, v.Get(&st))
	return st
}

// Concurrency: two in flight of two, the third refused with a short
// Retry-After, a retried admission admitted again without a unit, a
// release freeing one (once: a second release changes nothing), and
// tokens counted once, through the hook, at the release.
func TestQuotaConcurrencyAndRelease(t *testing.T) {
	var counted []string
	env := quotaEnv(&Quotas{Counted: func(k string, r quota.Release) {
		counted = append(counted, fmt.Sprintf("%s %d %d", k, r.TokensIn, r.TokensOut))
	}})
	l := apikey.Limits{ConcurrentTasks: 2}
	var results []quota.AdmitResult
	ok := func(r quota.AdmitResult, err error) { require.NoError(t, err); results = append(results, r) }
	var refused error
	admitAt(env, time.Second, "t1", l, ok)
	admitAt(env, 2*time.Second, "t2", l, ok)
	admitAt(env, 3*time.Second, "t3", l, func(_ quota.AdmitResult, err error) { refused = err })
	admitAt(env, 4*time.Second, "t2", l, ok) // a retry
	env.RegisterDelayedCallback(func() {
		env.SignalWorkflow(quota.SignalRelease, quota.Release{TaskID: "t1", TokensIn: 7, TokensOut: 5})
	}, 5*time.Second)
	env.RegisterDelayedCallback(func() {
		env.SignalWorkflow(quota.SignalRelease, quota.Release{TaskID: "t1", TokensIn: 7, TokensOut: 5})
	}, 6*time.Second)
	admitAt(env, 7*time.Second, "t3", l, ok)
	var st quota.State
	env.RegisterDelayedCallback(func() { st = quotaState(t, env) }, 8*time.Second)
	env.RegisterDelayedCallback(env.CancelWorkflow, 9*time.Second)
	env.ExecuteWorkflow(quota.WorkflowType, quota.Input{KeyID: "k1"})

	require.Equal(t, []quota.AdmitResult{{New: true}, {New: true}, {New: false}, {New: true}}, results)
	r := refusalOf(t, refused)
	require.Equal(t, quota.Refusal{Limit: quota.ConcurrentTasks, Allowed: 2, Used: 2, RetryAfterMs: 1000}, r)
	require.Equal(t, []string{"k1 7 5"}, counted, "a release counts once")
	require.Len(t, st.InFlight, 2)
	require.True(t, st.Holds("t2") && st.Holds("t3"), "%v", st.InFlight)
	require.EqualValues(t, 3, st.Requests)
	require.EqualValues(t, 7, st.TokensIn)
	require.EqualValues(t, 5, st.TokensOut)
	require.Equal(t, l, st.Limits)
}

// Requests per minute: the limit within a minute, then refused with the
// time until the oldest admission leaves the window; admitted again then.
// Tokens per minute: admitted while the window's tokens are below the
// limit, refused once a release takes them to it.
func TestQuotaWindow(t *testing.T) {
	env := quotaEnv(&Quotas{})
	rpm := apikey.Limits{RequestsPerMinute: 3}
	var admitted []string
	var refusals []error
	ok := func(id string) func(quota.AdmitResult, error) {
		return func(_ quota.AdmitResult, err error) {
			if err != nil {
				refusals = append(refusals, err)
				return
			}
			admitted = append(admitted, id)
		}
	}
	for i := range 4 {
		admitAt(env, time.Duration(10+i)*time.Second, fmt.Sprint("r", i), rpm, ok(fmt.Sprint("r", i)))
	}
	// r0 was admitted at 10 s: the window frees it at 70 s.
	admitAt(env, 69*time.Second, "r4", rpm, ok("r4"))
	admitAt(env, 71*time.Second, "r5", rpm, ok("r5"))

	tpm := apikey.Limits{TokensPerMinute: 100}
	admitAt(env, 200*time.Second, "k0", tpm, ok("k0"))
	admitAt(env, 201*time.Second, "k1", tpm, ok("k1"))
	env.RegisterDelayedCallback(func() {
		env.SignalWorkflow(quota.SignalRelease, quota.Release{TaskID: "k0", TokensIn: 40, TokensOut: 70})
	}, 202*time.Second)
	admitAt(env, 203*time.Second, "k2", tpm, ok("k2"))
	var st quota.State
	env.RegisterDelayedCallback(func() { st = quotaState(t, env) }, 204*time.Second)
	env.RegisterDelayedCallback(env.CancelWorkflow, 300*time.Second)
	start := env.Now()
	env.ExecuteWorkflow(quota.WorkflowType, quota.Input{KeyID: "k2"})

	require.Equal(t, []string{"r0", "r1", "r2", "r5", "k0", "k1"}, admitted)
	require.Len(t, refusals, 3)
	r := refusalOf(t, refusals[0])
	require.Equal(t, quota.RequestsPerMinute, r.Limit)
	require.Equal(t, 3, r.Used)
	// Refused at 13 s, the bucket of 10 s leaves the window at 70 s
	// (the start's sub-second offset aside).
	require.InDelta(t, 57000, r.RetryAfterMs, 1000)
	require.Equal(t, quota.RequestsPerMinute, refusalOf(t, refusals[1]).Limit)
	rt := refusalOf(t, refusals[2])
	require.Equal(t, quota.Refusal{Limit: quota.TokensPerMinute, Allowed: 100, Used: 110, RetryAfterMs: rt.RetryAfterMs}, rt)
	// Released at 202 s: its tokens leave the window at 262 s.
	require.InDelta(t, 59000, rt.RetryAfterMs, 1000)
	u := st.Usage(start.Add(204 * time.Second))
	require.Equal(t, 2, u.RequestsLastMinute)
	require.Equal(t, 40, u.TokensInLastMinute)
	require.Equal(t, 70, u.TokensOutLastMinute)
	require.Equal(t, 5, u.ConcurrentTasks, "r0, r1, r2, r5 and k1 are in flight")
	require.EqualValues(t, 6, u.Requests)
}

// A long history continues as new carrying the counters, the window and
// the tasks in flight; the new run releases a task the old one admitted.
func TestQuotaContinuesAsNewWithCounters(t *testing.T) {
	env := quotaEnv(&Quotas{})
	l := apikey.Limits{ConcurrentTasks: 100}
	for i := range 5 {
		admitAt(env, time.Duration(i+1)*time.Second, fmt.Sprint("t", i), l, func(_ quota.AdmitResult, err error) { require.NoError(t, err) })
	}
	// The test environment keeps no history: set the length the server
	// would report; a release of a task never admitted changes nothing
	// but wakes the run.
	env.RegisterDelayedCallback(func() { env.SetCurrentHistoryLength(40) }, 6*time.Second)
	env.RegisterDelayedCallback(func() { env.SignalWorkflow(quota.SignalRelease, quota.Release{TaskID: "unknown"}) }, 7*time.Second)
	env.ExecuteWorkflow(quota.WorkflowType, quota.Input{KeyID: "k3", MaxEvents: 30})
	var can *workflow.ContinueAsNewError
	require.True(t, errors.As(env.GetWorkflowError(), &can), "want continue-as-new, got %v", env.GetWorkflowError())
	var in quota.Input
	require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(can.Input, &in))
	require.Equal(t, "k3", in.KeyID)
	require.Equal(t, 30, in.MaxEvents)
	require.NotNil(t, in.Carry)
	n := len(in.Carry.InFlight)
	require.Equal(t, 5, n)
	require.EqualValues(t, n, in.Carry.Requests)

	next := quotaEnv(&Quotas{})
	var st quota.State
	first := in.Carry.InFlight[0].TaskID
	next.RegisterDelayedCallback(func() { next.SignalWorkflow(quota.SignalRelease, quota.Release{TaskID: first, TokensOut: 3}) }, time.Second)
	next.RegisterDelayedCallback(func() { st = quotaState(t, next) }, 2*time.Second)
	next.RegisterDelayedCallback(next.CancelWorkflow, 3*time.Second)
	next.ExecuteWorkflow(quota.WorkflowType, in)
	require.Len(t, st.InFlight, n-1)
	require.EqualValues(t, 3, st.TokensOut)
	require.EqualValues(t, n, st.Requests)
}

// A task of a key without limits reports its end: its request and tokens
// count once (the report may repeat), through the hook too, and it holds
// no unit of concurrency.
func TestQuotaCountsUnadmittedTasks(t *testing.T) {
	var counted []quota.Release
	env := quotaEnv(&Quotas{Counted: func(_ string, r quota.Release) { counted = append(counted, r) }})
	r := quota.Release{TaskID: "u1", TokensIn: 3, TokensOut: 8, Unadmitted: true}
	env.RegisterDelayedCallback(func() { env.SignalWorkflow(quota.SignalRelease, r) }, time.Second)
	env.RegisterDelayedCallback(func() { env.SignalWorkflow(quota.SignalRelease, r) }, 2*time.Second)
	var st quota.State
	env.RegisterDelayedCallback(func() { st = quotaState(t, env) }, 3*time.Second)
	env.RegisterDelayedCallback(env.CancelWorkflow, 4*time.Second)
	env.ExecuteWorkflow(quota.WorkflowType, quota.Input{KeyID: "free"})
	require.Equal(t, []quota.Release{r}, counted)
	require.EqualValues(t, 1, st.Requests)
	require.EqualValues(t, 3, st.TokensIn)
	require.EqualValues(t, 8, st.TokensOut)
	require.Empty(t, st.InFlight)
}

// The sweep: every SweepAfter while tasks are in flight, the admissions
// older than that are asked about, SweepBatch at a time, those never
// asked first; one whose task is not running is released (without
// tokens, and not through the hook); the running ones are asked again only
// a SweepAfter later, so the next sweep reaches the rest.
func TestQuotaSweepReleasesOrphans(t *testing.T) {
	var counted int
	var calls [][]string
	env := quotaEnv(&Quotas{Counted: func(string, quota.Release) { counted++ }}, func(ids []string) []string {
		calls = append(calls, ids)
		var running []string
		for _, id := range ids {
			if id != "gone" {
				running = append(running, id)
			}
		}
		return running
	})
	l := apikey.Limits{ConcurrentTasks: 100}
	ok := func(_ quota.AdmitResult, err error) { require.NoError(t, err) }
	admitAt(env, time.Second, "gone", l, ok)
	for i := range quota.SweepBatch + 1 {
		admitAt(env, time.Second, fmt.Sprint("live-", i), l, ok)
	}
	var before, after quota.State
	env.RegisterDelayedCallback(func() { before = quotaState(t, env) }, 100*time.Second)
	env.RegisterDelayedCallback(func() { after = quotaState(t, env) }, 190*time.Second)
	env.RegisterDelayedCallback(env.CancelWorkflow, 200*time.Second)
	env.ExecuteWorkflow(quota.WorkflowType, quota.Input{KeyID: "k-sweep"})

	require.True(t, before.Holds("gone"), "not yet a sweep's age at the first sweep")
	require.False(t, after.Holds("gone"), "released by the sweep")
	require.Len(t, after.InFlight, quota.SweepBatch+1)
	require.Len(t, calls, 2, "%v", calls)
	require.Len(t, calls[0], quota.SweepBatch)
	require.Equal(t, "gone", calls[0][0])
	require.Equal(t, []string{fmt.Sprint("live-", quota.SweepBatch-1), fmt.Sprint("live-", quota.SweepBatch)}, calls[1])
	require.Zero(t, counted, "a swept admission counts no tokens")
	require.EqualValues(t, quota.SweepBatch+2, after.Requests)
}
