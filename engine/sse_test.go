package engine

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The first token goes at once; tokens right after it wait in the buffer
// and go out together within tokenHold; stop flushes what waits.
func TestTokenWriterCoalesces(t *testing.T) {
	rec := httptest.NewRecorder()
	tw := newTokenWriter(rec)
	flushed := func() bool {
		tw.mu.Lock()
		defer tw.mu.Unlock()
		f := rec.Flushed
		rec.Flushed = false
		return f
	}
	require.NoError(t, tw.event(map[string]any{"content": "a"}))
	require.True(t, flushed(), "the first token is flushed at once")
	start := time.Now()
	require.NoError(t, tw.event(map[string]any{"content": "b"}))
	require.NoError(t, tw.event(map[string]any{"content": "c"}))
	require.False(t, flushed(), "a burst waits")
	deadline := time.Now().Add(5 * time.Second)
	for !flushed() {
		require.True(t, time.Now().Before(deadline), "the burst was never flushed")
		time.Sleep(time.Millisecond)
	}
	require.GreaterOrEqual(t, time.Since(start), tokenHold/2, "held, not flushed per token")
	require.NoError(t, tw.event(map[string]any{"content": "d"}))
	tw.stop()
	require.True(t, flushed(), "stop flushes what waits")
	tw.stop() // again: nothing
	require.Equal(t, 4, strings.Count(rec.Body.String(), "data: "))
}
