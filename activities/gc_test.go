package activities_test

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// GC never deletes a partial download that a staging is writing (it holds
// the file's lock); once the lock is gone, the stale partial goes.
func TestEvictSkipsPartialBeingWritten(t *testing.T) {
	local, err := modelstore.NewLocalCatalog(t.TempDir())
	require.NoError(t, err)
	sha := strings.Repeat("d", 64)
	path := local.PartialPath(sha)
	require.NoError(t, os.WriteFile(path, []byte("partial bytes"), 0o644))
	writer, err := os.Open(path)
	require.NoError(t, err)
	require.NoError(t, unix.Flock(int(writer.Fd()), unix.LOCK_EX|unix.LOCK_NB))

	var ts testsuite.WorkflowTestSuite
	env := ts.NewTestActivityEnvironment()
	a := &activities.GCActivities{Local: local, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	env.RegisterActivity(a)
	in := activities.EvictInput{NodeID: "n1", Eviction: model.Eviction{Kind: "partial", SHA256: sha, Reason: "stale-partial"}}
	_, err = env.ExecuteActivity(a.Evict, in)
	var appErr *temporal.ApplicationError
	require.True(t, errors.As(err, &appErr), "got %v", err)
	require.Equal(t, model.ErrInUse, appErr.Type())
	require.FileExists(t, path)

	require.NoError(t, writer.Close()) // the download ended
	_, err = env.ExecuteActivity(a.Evict, in)
	require.NoError(t, err)
	require.NoFileExists(t, path)
}
