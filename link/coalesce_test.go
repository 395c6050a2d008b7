package link

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
)

// After a write that carried tokens the link holds back, so the tokens of
// a burst go out together; the first token goes out at once, and the
// final event cuts the hold short. The hold here is an hour: a stream
// that waited for it would time the test out.
func TestTaskEventsCoalesce(t *testing.T) {
	hub := &tokenstream.Hub{}
	f := serve(t, Options{Token: token, Streams: hub})
	f.srv.flushInterval = time.Hour
	st := hub.Open("t1", 0)
	batches := make(chan []task.Event, 16)
	errs := make(chan error, 1)
	go func() {
		errs <- f.client().EventBatches(context.Background(), "t1", -1, func(evs []task.Event) error {
			batches <- append([]task.Event(nil), evs...)
			return nil
		})
	}()
	var got []task.Event
	_, _ = st.Push([]task.Event{{Type: "started", NodeID: "n1"}})
	got = append(got, <-batches...)
	_, _ = st.Push([]task.Event{tok(0)})
	got = append(got, <-batches...) // at once: no token before it
	require.Equal(t, []string{"started", "token"}, types(got))
	for i := 1; i <= 3; i++ {
		_, _ = st.Push([]task.Event{tok(i)})
	}
	st.Finish(task.Event{Type: "end", TokensOut: 4})
	require.NoError(t, <-errs)
	last := <-batches
	require.Equal(t, []string{"token", "token", "token", "end"}, types(last), "the burst and the end in one write")
	require.Equal(t, 3, last[2].I)
	require.Empty(t, batches)

	// A subscriber that leaves while the link holds back ends its handler.
	st = hub.Open("t2", 0)
	_, _ = st.Push([]task.Event{tok(0)})
	ctx, cancel := context.WithCancel(context.Background())
	got = nil
	go func() {
		errs <- f.client().Events(ctx, "t2", -1, func(ev task.Event) error { got = append(got, ev); cancel(); return nil })
	}()
	require.Error(t, <-errs)
	require.Equal(t, []string{"token"}, types(got))
	testenv.Eventually(t, 10*time.Second, "the handler ended", func() (bool, string) {
		return len(f.srv.subs) == 0, fmt.Sprint(len(f.srv.subs))
	})
}

// Token lines of any length and text, keep-alives, and lines the fast
// path leaves to encoding/json all read back in order.
func TestTaskEventsLines(t *testing.T) {
	hub := &tokenstream.Hub{}
	f := serve(t, Options{Token: token, Streams: hub})
	st := hub.Open("t1", 0)
	long := strings.Repeat("é\"\n<", 40<<10) // longer than the client's buffer, escaped
	want := []task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"},
		{Type: "metrics", Metrics: map[string]any{"waiting": true}},
		{Type: "token", I: 0, T: long, Tok: 1}, {Type: "token", I: 1, T: "\u2028\xff", Tok: 2}, {Type: "token", I: 2, T: "plain", Tok: -3},
		{Type: "end", TokensOut: 3, StopType: "eos"}}
	_, _ = st.Push(want)
	var got []task.Event
	require.NoError(t, f.client().Events(context.Background(), "t1", -1, func(ev task.Event) error { got = append(got, ev); return nil }))
	want[3].T = "\u2028\uFFFD" // as encoding/json carries invalid UTF-8
	require.Equal(t, len(want), len(got))
	for i := range want {
		require.Equal(t, want[i].Type, got[i].Type)
		require.Equal(t, want[i].T, got[i].T)
		require.Equal(t, want[i].I, got[i].I)
		require.Equal(t, want[i].Tok, got[i].Tok)
	}
	require.Equal(t, "eos", got[5].StopType)
	require.Equal(t, true, got[1].Metrics["waiting"])
}
