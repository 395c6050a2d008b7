package activities

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/task"
)

// flakyOutputs takes outputs in memory after failing the first fail writes
// (fault injection: the bucket's side is outputs' own test, on real S3).
type flakyOutputs struct {
	mu    sync.Mutex
	fail  int
	calls int
	keys  []string
}

func (f *flakyOutputs) Write(_ context.Context, key string, out task.Output) (task.OutputRef, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls <= f.fail {
		return task.OutputRef{}, errors.New("bucket unreachable")
	}
	f.keys = append(f.keys, key)
	return task.OutputRef{Key: key, Bytes: 1, SHA256: "x", Tokens: len(out.Tokens)}, nil
}

func output(n int) task.Result {
	res := task.Result{TokensIn: 3, StopType: "limit"}
	for i := range n {
		res.Tokens = append(res.Tokens, int32(i))
		res.Pieces = append(res.Pieces, fmt.Sprintf("w%d ", i))
	}
	return res
}

// offload runs g.offload inside an activity, with the key Generate gives it.
func offload(t *testing.T, g *GenerateActivities, res task.Result) (task.Result, error) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestActivityEnvironment()
	env.RegisterActivityWithOptions(func(ctx context.Context) (task.Result, error) {
		info := activity.GetInfo(ctx)
		return g.offload(ctx, "t-big", outputs.Key("t-big", info.ActivityID, info.Attempt), res, slog.Default())
	}, activity.RegisterOptions{Name: "Offload"})
	v, err := env.ExecuteActivity("Offload")
	if err != nil {
		return task.Result{}, err
	}
	var out task.Result
	require.NoError(t, v.Get(&out))
	return out, nil
}

// An output above the bound goes to the bucket and the result holds its
// reference alone; one at or below it stays inline; a bucket that fails
// now and then is retried, one that keeps failing fails the task with
// OUTPUT_UNSTORED.
func TestGenerateOffloadsLargeOutputs(t *testing.T) {
	small := output(10)
	bound := outputs.Size(task.Output{Tokens: small.Tokens, Pieces: small.Pieces})
	w := &flakyOutputs{}
	g := &GenerateActivities{NodeID: "n1", Outputs: w, MaxInlineOutput: bound}

	res, err := offload(t, g, small)
	require.NoError(t, err)
	require.Nil(t, res.Output)
	require.Equal(t, small.Pieces, res.Pieces, "at the bound: inline")
	require.Zero(t, w.calls)

	big := output(11)
	res, err = offload(t, g, big)
	require.NoError(t, err)
	require.NotNil(t, res.Output)
	require.Empty(t, res.Tokens)
	require.Empty(t, res.Pieces)
	require.Equal(t, 11, res.Output.Tokens)
	require.Equal(t, 3, res.TokensIn)
	require.Len(t, w.keys, 1)
	require.True(t, strings.HasPrefix(w.keys[0], outputs.Prefix+"t-big/"), w.keys[0])

	w2 := &flakyOutputs{fail: 2}
	g.Outputs = w2
	res, err = offload(t, g, big)
	require.NoError(t, err)
	require.NotNil(t, res.Output, "stored on the third try")
	require.Equal(t, 3, w2.calls)

	g.Outputs = &flakyOutputs{fail: 100}
	_, err = offload(t, g, big)
	var app *temporal.ApplicationError
	require.True(t, errors.As(err, &app), "%v", err)
	require.Equal(t, task.ErrOutputUnstored, app.Type())
	require.True(t, app.NonRetryable())
	require.Contains(t, app.Message(), "task t-big")

	g.Outputs = nil
	res, err = offload(t, g, big)
	require.NoError(t, err)
	require.Nil(t, res.Output, "no bucket: inline")
}

// A WORKER_RESET carries the tokens up to the bound, the count above it.
func TestResetProgressBounded(t *testing.T) {
	r := output(20)
	p := task.Progress{Tokens: r.Tokens, Pieces: r.Pieces}
	size := outputs.Size(task.Output{Tokens: p.Tokens, Pieces: p.Pieces})
	require.Equal(t, p, resetProgress(p, size))
	require.Equal(t, task.Progress{Produced: 20}, resetProgress(p, size-1))
}
