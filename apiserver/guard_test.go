package apiserver

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// A stream writer that panics is recovered, logged with its task and
// counted: fasthttp's writer goroutine would otherwise end the process.
func TestGuardStreamRecovers(t *testing.T) {
	logs := &bytes.Buffer{}
	s := &Server{metrics: newMetrics(prometheus.NewRegistry())}
	log := slog.New(slog.NewTextHandler(logs, nil)).With("task_id", "t-boom")
	write := s.guardStream(log, func(*bufio.Writer) {
		var evs []int
		_ = evs[3] // an index out of range, as an overflowed cursor would make
	})
	require.NotPanics(t, func() { write(bufio.NewWriter(io.Discard)) })
	require.Equal(t, 1.0, testutil.ToFloat64(s.metrics.streamPanics))
	require.Contains(t, logs.String(), "task_id=t-boom")
	require.Contains(t, logs.String(), "index out of range")
}
