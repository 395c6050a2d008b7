package testenv

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	historypb "go.temporal.io/api/history/v1"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/stretchr/testify/require"
)

// History reads a workflow run's events as Temporal holds them (runID ""
// for the latest run): payloads encrypted by the env's codec.
func (e *Env) History(t testing.TB, workflowID, runID string) *historypb.History {
	t.Helper()
	it := e.Temporal.GetWorkflowHistory(context.Background(), workflowID, runID, false, 0)
	h := &historypb.History{}
	for it.HasNext() {
		ev, err := it.Next()
		require.NoError(t, err)
		h.Events = append(h.Events, ev)
	}
	return h
}

// RecordHistory writes a workflow run's history into
// replay_tests/testdata/<name>.json when LLORCH_RECORD_HISTORIES=1 (`just
// record-histories`), and returns it; nil when not recording. It is
// written in plaintext: the replay tests hold no key, and decode plaintext
// the way histories from before the codec are.
func (e *Env) RecordHistory(t testing.TB, workflowID, runID, name string) *historypb.History {
	t.Helper()
	if os.Getenv("LLORCH_RECORD_HISTORIES") != "1" {
		return nil
	}
	h := e.History(t, workflowID, runID)
	require.NoError(t, e.Codec.DecodeMessage(context.Background(), h))
	raw, err := protojson.MarshalOptions{Indent: "  "}.Marshal(h)
	require.NoError(t, err)
	path := filepath.Join(RepoRoot(), "replay_tests", "testdata", name+".json")
	require.NoError(t, os.WriteFile(path, raw, 0o644))
	t.Logf("recorded %d events of %s to %s", len(h.Events), workflowID, path)
	return h
}
