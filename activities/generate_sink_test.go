package activities

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// A generation holds its node stream while it runs: one waiting long at the
// node for a slot, with no subscriber, is not dropped as abandoned (a
// quiet stream beside it is, so the hub's sweep did run); once it ends,
// its stream goes like any finished one.
func TestGenerationHoldsItsStream(t *testing.T) {
	hub := &tokenstream.Hub{Keep: 20 * time.Millisecond}
	g := &GenerateActivities{Streams: hub}
	sink := g.openSink(GenerateInput{Request: task.Request{TaskID: "t-waiting"}}, false)
	sink.Send(task.Event{Type: "started", NodeID: "n1", PoolID: "p1"})
	quiet := hub.Stream("t-quiet")
	_, _ = quiet.Push([]task.Event{{Type: "started", NodeID: "n1"}})
	deadline := time.Now().Add(10 * time.Second)
	for hub.Peek("t-quiet") != nil {
		require.True(t, time.Now().Before(deadline), "the quiet stream beside it was never swept")
		time.Sleep(5 * time.Millisecond)
		hub.Stream("t-other") // the sweep runs on the hub's path
	}
	require.NotNil(t, hub.Peek("t-waiting"), "a running generation's stream is kept, however quiet")
	require.False(t, hub.Peek("t-waiting").Ended())

	sink.Send(task.Event{Type: "end", TokensOut: 0})
	sink.close(context.Background(), nil, slog.Default())
	for hub.Peek("t-waiting") != nil {
		require.True(t, time.Now().Before(deadline), "a finished generation's stream is kept forever")
		time.Sleep(5 * time.Millisecond)
		hub.Stream("t-other")
	}
}
