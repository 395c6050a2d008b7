package workflows

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	sess "github.com/llorch/llorch/session"
)

func sessionEnv() *testsuite.TestWorkflowEnvironment {
	var ts testsuite.WorkflowTestSuite
	env := ts.NewTestWorkflowEnvironment()
	env.SetTestTimeout(30 * time.Second)
	return env
}

// sessionUpdate sends an update at d of workflow time; out gets its outcome
// (a rejection as an error).
func sessionUpdate(env *testsuite.TestWorkflowEnvironment, d time.Duration, name string, arg any, out func(any, error)) {
	env.RegisterDelayedCallback(func() {
		var args []any
		if arg != nil {
			args = []any{arg}
		}
		env.UpdateWorkflow(name, fmt.Sprint(name, "-", d, "-", arg), &testsuite.TestUpdateCallback{
			OnReject: func(err error) { out(nil, err) }, OnAccept: func() {}, OnComplete: out,
		}, args...)
	}, d)
}

func errType(err error) string {
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return app.Type()
	}
	return ""
}

func sessionInfo(t *testing.T, env *testsuite.TestWorkflowEnvironment) sess.Info {
	v, err := env.QueryWorkflow(sess.QueryInfo)
	require.NoError(t, err)
	var info sess.Info
	require.NoError(t, v.Get(&info))
	return info
}

// Eight turns in order, the ninth refused with SESSION_TURN_LIMIT, a
// retried task's turn given back unchanged even when full, bad turns
// rejected; each turn moves the expiry, and the session closes TTL after
// its last turn.
func TestSessionTurnsLimitAndExpiry(t *testing.T) {
	env := sessionEnv()
	var got []sess.TurnResult
	for i := range sess.MaxTurns {
		// One turn a minute: each moves the expiry on.
		sessionUpdate(env, time.Duration(i)*time.Minute, sess.UpdateTurn, sess.TurnRequest{TaskID: fmt.Sprint("t", i), ModelID: "m"},
			func(r any, err error) { require.NoError(t, err); got = append(got, r.(sess.TurnResult)) })
	}
	last := time.Duration(sess.MaxTurns-1) * time.Minute
	var over, bad, noModel error
	var again sess.TurnResult
	sessionUpdate(env, last+time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t9", ModelID: "m"}, func(_ any, err error) { over = err })
	sessionUpdate(env, last+2*time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t2", ModelID: "m"},
		func(r any, err error) { require.NoError(t, err); again = r.(sess.TurnResult) })
	sessionUpdate(env, last+3*time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "../x", ModelID: "m"}, func(_ any, err error) { bad = err })
	sessionUpdate(env, last+4*time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t10"}, func(_ any, err error) { noModel = err })
	var mid sess.Info
	env.RegisterDelayedCallback(func() { mid = sessionInfo(t, env) }, last+5*time.Second)
	start := env.Now()
	env.ExecuteWorkflow(Session, sess.Input{SessionID: "s1"})
	require.True(t, env.IsWorkflowCompleted())
	require.NoError(t, env.GetWorkflowError())

	require.Len(t, got, sess.MaxTurns)
	for i, r := range got {
		require.Equal(t, sess.TurnResult{Turn: i + 1, New: true}, r)
	}
	require.Equal(t, sess.ErrTurnLimit, errType(over), "%v", over)
	require.ErrorContains(t, over, "session s1 has had its 8 turns; start a new session")
	require.Equal(t, sess.TurnResult{Turn: 3, New: false}, again, "a retried task keeps its turn")
	require.Equal(t, sess.ErrInvalid, errType(bad), "%v", bad)
	require.Equal(t, sess.ErrInvalid, errType(noModel), "%v", noModel)

	require.Equal(t, "s1", mid.SessionID)
	require.Equal(t, "m", mid.ModelID)
	require.Equal(t, []string{"t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"}, mid.TaskIDs)
	require.WithinDuration(t, start.Add(last), mid.LastUsed, time.Second)
	require.WithinDuration(t, start.Add(last+sess.TTL), mid.ExpiresAt, time.Second)

	var info sess.Info
	require.NoError(t, env.GetWorkflowResult(&info))
	require.Equal(t, mid.TaskIDs, info.TaskIDs)
	require.WithinDuration(t, start.Add(last+sess.TTL), env.Now(), time.Second, "closes TTL after the last turn, not the first")
}

// With no turn for TTL after its first, a session closes at its expiry.
func TestSessionExpiresAfterItsLastTurn(t *testing.T) {
	env := sessionEnv()
	sessionUpdate(env, 0, sess.UpdateTurn, sess.TurnRequest{TaskID: "a", ModelID: "m"}, func(_ any, err error) { require.NoError(t, err) })
	var before sess.Info
	env.RegisterDelayedCallback(func() { before = sessionInfo(t, env) }, sess.TTL-time.Second)
	start := env.Now()
	env.ExecuteWorkflow(Session, sess.Input{SessionID: "s2"})
	require.NoError(t, env.GetWorkflowError())
	require.Equal(t, []string{"a"}, before.TaskIDs, "still open a moment before its expiry")
	require.WithinDuration(t, start.Add(sess.TTL), env.Now(), time.Second)
}

// End closes a session at once; a turn then is refused as closing (the
// client starts a fresh session).
func TestSessionEnd(t *testing.T) {
	env := sessionEnv()
	sessionUpdate(env, 0, sess.UpdateTurn, sess.TurnRequest{TaskID: "a", ModelID: "m"}, func(_ any, err error) { require.NoError(t, err) })
	ended := false
	sessionUpdate(env, time.Minute, sess.UpdateEnd, nil, func(_ any, err error) { require.NoError(t, err); ended = true })
	start := env.Now()
	env.ExecuteWorkflow(Session, sess.Input{SessionID: "s3"})
	require.NoError(t, env.GetWorkflowError())
	require.True(t, ended)
	require.WithinDuration(t, start.Add(time.Minute), env.Now(), time.Second, "ended, not expired")
	var info sess.Info
	require.NoError(t, env.GetWorkflowResult(&info))
	require.Equal(t, []string{"a"}, info.TaskIDs)
}

// A released turn is free again; a session whose only turn is given back
// closes (it never served a task).
func TestSessionRelease(t *testing.T) {
	env := sessionEnv()
	for i := range sess.MaxTurns {
		sessionUpdate(env, 0, sess.UpdateTurn, sess.TurnRequest{TaskID: fmt.Sprint("t", i), ModelID: "m"}, func(_ any, err error) { require.NoError(t, err) })
	}
	sessionUpdate(env, time.Second, sess.UpdateRelease, sess.ReleaseRequest{TaskID: "t3"}, func(_ any, err error) { require.NoError(t, err) })
	sessionUpdate(env, 2*time.Second, sess.UpdateRelease, sess.ReleaseRequest{TaskID: "ghost"}, func(_ any, err error) { require.NoError(t, err) })
	var bad error
	sessionUpdate(env, 2*time.Second, sess.UpdateRelease, sess.ReleaseRequest{}, func(_ any, err error) { bad = err })
	var r sess.TurnResult
	sessionUpdate(env, 3*time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t8", ModelID: "m"},
		func(v any, err error) { require.NoError(t, err); r = v.(sess.TurnResult) })
	for i := range sess.MaxTurns + 1 {
		if i == 3 {
			continue
		}
		sessionUpdate(env, 4*time.Second, sess.UpdateRelease, sess.ReleaseRequest{TaskID: fmt.Sprint("t", i)}, func(_ any, err error) { require.NoError(t, err) })
	}
	start := env.Now()
	env.ExecuteWorkflow(Session, sess.Input{SessionID: "s4"})
	require.NoError(t, env.GetWorkflowError())
	require.Equal(t, sess.ErrInvalid, errType(bad), "%v", bad)
	require.Equal(t, sess.TurnResult{Turn: 8, New: true}, r, "the released turn is taken again")
	require.WithinDuration(t, start.Add(4*time.Second), env.Now(), time.Second, "closed when its last turn was given back")
	var info sess.Info
	require.NoError(t, env.GetWorkflowResult(&info))
	require.Empty(t, info.TaskIDs)
}

// A session is its first turn's key's: another key's turn is refused
// (SESSION_NOT_OWNER), the owner's taken; a turn without an owner (an
// older release) is the bootstrap key's.
func TestSessionOwner(t *testing.T) {
	env := sessionEnv()
	var mine, theirs error
	sessionUpdate(env, 0, sess.UpdateTurn, sess.TurnRequest{TaskID: "t1", ModelID: "m", Owner: "k1"}, func(_ any, err error) { require.NoError(t, err) })
	sessionUpdate(env, time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t2", ModelID: "m", Owner: "k2"}, func(_ any, err error) { theirs = err })
	sessionUpdate(env, 2*time.Second, sess.UpdateTurn, sess.TurnRequest{TaskID: "t3", ModelID: "m", Owner: "k1"}, func(_ any, err error) { mine = err })
	var info sess.Info
	env.RegisterDelayedCallback(func() { info = sessionInfo(t, env) }, 3*time.Second)
	env.RegisterDelayedCallback(func() {
		sessionUpdate(env, 0, sess.UpdateEnd, nil, func(_ any, err error) { require.NoError(t, err) })
	}, 4*time.Second)
	env.ExecuteWorkflow(Session, sess.Input{SessionID: "s-own"})
	require.Equal(t, sess.ErrNotOwner, errType(theirs), "%v", theirs)
	require.NoError(t, mine)
	require.Equal(t, "k1", info.Owner)
	require.Equal(t, []string{"t1", "t3"}, info.TaskIDs)
	require.Equal(t, "bootstrap", ownerOf(""))
}
