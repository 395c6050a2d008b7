package activities_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// env is the real services (Temporal, versitygw) of the activities test
// binary; keep its one TestMain here. The tests live in activities_test
// because testenv imports workflows, which imports activities.
var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

const stageTestSize = 12 << 20

type stageFixture struct {
	store *modelstore.Store
	local *modelstore.LocalCatalog
	acts  *activities.StagingActivities
}

func newStageFixture(t *testing.T) *stageFixture {
	t.Helper()
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, store.EnsureBucket(context.Background()))
	local, err := modelstore.NewLocalCatalog(filepath.Join(t.TempDir(), "models"))
	require.NoError(t, err)
	return &stageFixture{store: store, local: local, acts: &activities.StagingActivities{
		Store: store, Local: local, Metrics: activities.NewStagingMetrics(prometheus.NewRegistry()),
		DiskMargin: 1 << 20, CheckpointEvery: 10 * time.Millisecond,
	}}
}

// put uploads data with minio directly and returns the entry that names it.
func (f *stageFixture) put(t *testing.T, data []byte) model.Entry {
	t.Helper()
	sha := testenv.SHA256(data)
	key := "models/stage-test-" + sha[:12] + ".gguf"
	_, err := f.store.Client.PutObject(context.Background(), f.store.Bucket, key, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{})
	require.NoError(t, err)
	return model.Entry{ID: "stage-test-" + sha[:8], Key: key, SHA256: sha, Size: int64(len(data)), Lifecycle: model.Active}
}

func (f *stageFixture) stage(t *testing.T, in activities.StageInput, setup ...func(*testsuite.TestActivityEnvironment)) (model.StageResult, error) {
	t.Helper()
	var s testsuite.WorkflowTestSuite
	aenv := s.NewTestActivityEnvironment()
	aenv.RegisterActivity(f.acts)
	for _, fn := range setup {
		fn(aenv)
	}
	val, err := aenv.ExecuteActivity(f.acts.StageModel, in)
	if err != nil {
		return model.StageResult{}, err
	}
	var res model.StageResult
	require.NoError(t, val.Get(&res))
	return res, nil
}

func applicationError(t *testing.T, err error, typ string) *temporal.ApplicationError {
	t.Helper()
	require.Error(t, err)
	var app *temporal.ApplicationError
	require.True(t, errors.As(err, &app), "not an application error: %v", err)
	assert.Equal(t, typ, app.Type(), app.Error())
	return app
}

func (f *stageFixture) assertNothingStaged(t *testing.T, sha string) {
	t.Helper()
	assert.NoFileExists(t, f.local.PartialPath(sha))
	assert.NoFileExists(t, f.local.Path(sha))
	list, err := f.local.List()
	require.NoError(t, err)
	assert.Empty(t, list)
}

// sample reads one metric child.
func sample(t *testing.T, c any) *dto.Metric {
	t.Helper()
	var m dto.Metric
	require.NoError(t, c.(prometheus.Metric).Write(&m))
	return &m
}

func value(t *testing.T, c any) float64 {
	t.Helper()
	m := sample(t, c)
	if m.Gauge != nil {
		return m.GetGauge().GetValue()
	}
	return m.GetCounter().GetValue()
}

func hashState(t *testing.T, data []byte) []byte {
	t.Helper()
	h := sha256.New()
	h.Write(data)
	st, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	require.NoError(t, err)
	return st
}

func TestStageModelDownloadsThenAlreadyPresent(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, stageTestSize)
	e := f.put(t, data)
	in := activities.StageInput{NodeID: "node-a", Entry: e}

	res, err := f.stage(t, in)
	require.NoError(t, err)
	assert.False(t, res.AlreadyPresent)
	assert.Equal(t, f.local.Path(e.SHA256), res.Path)
	assert.Equal(t, e.SHA256, res.SHA256)
	assert.Equal(t, e.Size, res.Size)
	assert.Equal(t, e.Size, res.BytesTransferred)

	got, err := os.ReadFile(filepath.Join(f.local.Dir, e.SHA256+".gguf"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, got), "staged bytes differ")
	assert.NoFileExists(t, f.local.PartialPath(e.SHA256))

	var side modelstore.Provenance
	b, err := os.ReadFile(filepath.Join(f.local.Dir, e.SHA256+".json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &side))
	assert.Equal(t, e.ID, side.ModelID)
	assert.Equal(t, e.Key, side.Key)
	assert.Equal(t, e.Size, side.Size)
	assert.Equal(t, f.store.Bucket, side.Bucket)
	assert.Equal(t, env.S3.Endpoint, side.Endpoint)
	assert.NotEmpty(t, side.ETag)
	assert.Equal(t, e.Size, side.BytesTransferred)
	assert.Equal(t, 1, side.Attempts)
	assert.False(t, side.StagedAt.IsZero())

	m := f.acts.Metrics
	assert.Equal(t, float64(e.Size), value(t, m.Bytes.WithLabelValues("node-a")))
	assert.Equal(t, float64(e.Size), value(t, m.CatalogBytes.WithLabelValues("node-a")))
	assert.Equal(t, 1, int(sample(t, m.Duration.WithLabelValues("node-a")).GetHistogram().GetSampleCount()))

	time.Sleep(5 * time.Millisecond)
	res, err = f.stage(t, in)
	require.NoError(t, err)
	assert.True(t, res.AlreadyPresent)
	assert.Zero(t, res.BytesTransferred)
	assert.Equal(t, f.local.Path(e.SHA256), res.Path)
	assert.Equal(t, float64(e.Size), value(t, m.Bytes.WithLabelValues("node-a")), "nothing fetched")
	prov, ok, err := f.local.Get(e.SHA256)
	require.NoError(t, err)
	require.True(t, ok)
	assert.True(t, prov.LastUsed.After(side.LastUsed), "use recorded")
}

func TestStageModelResumesFromHeartbeat(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, stageTestSize)
	e := f.put(t, data)
	const k = 5<<20 + 12345

	// The partial holds the checkpointed bytes and some after them that may
	// never have reached the disk: garbage the resume must cut off.
	require.NoError(t, os.WriteFile(f.local.PartialPath(e.SHA256), append(append([]byte{}, data[:k]...), "garbage"...), 0o644))
	res, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e}, func(a *testsuite.TestActivityEnvironment) {
		a.SetHeartbeatDetails(activities.StageProgress{Offset: k, HashState: hashState(t, data[:k])})
	})
	require.NoError(t, err)
	assert.Equal(t, e.Size-k, res.BytesTransferred, "only the rest is fetched")
	got, err := os.ReadFile(res.Path)
	require.NoError(t, err)
	assert.Equal(t, e.SHA256, testenv.SHA256(got))
}

func TestStageModelResumesAfterCancellation(t *testing.T) {
	f := newStageFixture(t)
	f.acts.CheckpointEvery = time.Nanosecond // a checkpoint after every read
	data := testenv.RandomBytes(t, stageTestSize)
	e := f.put(t, data)
	in := activities.StageInput{NodeID: "node-a", Entry: e}

	// First attempt: cancelled at its first checkpoint, like a worker
	// stopping mid-download.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var last activities.StageProgress
	_, err := f.stage(t, in, func(a *testsuite.TestActivityEnvironment) {
		a.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctx})
		a.SetOnActivityHeartbeatListener(func(_ *activity.Info, d converter.EncodedValues) {
			var p activities.StageProgress
			if d.Get(&p) == nil && p.Offset > last.Offset {
				last = p
			}
			cancel()
		})
	})
	require.Error(t, err)
	require.Positive(t, last.Offset, "a checkpoint was recorded")
	require.Less(t, last.Offset, e.Size)
	fi, err := os.Stat(f.local.PartialPath(e.SHA256))
	require.NoError(t, err)
	assert.GreaterOrEqual(t, fi.Size(), last.Offset, "the checkpointed bytes are on disk")
	assert.Equal(t, last.Offset, last.Transferred)
	_, ok, err := f.local.Get(e.SHA256)
	require.NoError(t, err)
	assert.False(t, ok)

	// Second attempt resumes from the last heartbeat.
	res, err := f.stage(t, in, func(a *testsuite.TestActivityEnvironment) { a.SetHeartbeatDetails(last) })
	require.NoError(t, err)
	assert.Equal(t, e.Size-last.Offset, res.BytesTransferred)
	got, err := os.ReadFile(res.Path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, got))
	prov, ok, err := f.local.Get(e.SHA256)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, e.Size, prov.BytesTransferred, "both attempts' bytes")
}

func TestStageModelStartsOverWithoutProgress(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, 3<<20)
	e := f.put(t, data)
	other := testenv.RandomBytes(t, 1<<20)

	// A partial with no heartbeat to vouch for it, then one whose
	// checkpoint came from another version of the object.
	for _, details := range []*activities.StageProgress{nil, {Offset: 1 << 20, HashState: hashState(t, other), ETag: "\"stale\""}} {
		require.NoError(t, os.WriteFile(f.local.PartialPath(e.SHA256), other, 0o644))
		res, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e}, func(a *testsuite.TestActivityEnvironment) {
			if details != nil {
				a.SetHeartbeatDetails(*details)
			}
		})
		require.NoError(t, err)
		assert.Equal(t, e.Size, res.BytesTransferred)
		got, err := os.ReadFile(res.Path)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(data, got))
		require.NoError(t, f.local.Remove(e.SHA256))
	}
}

func TestStageModelSignalsProgress(t *testing.T) {
	f := newStageFixture(t)
	f.acts.CheckpointEvery = time.Nanosecond
	f.acts.Client = env.Temporal
	data := testenv.RandomBytes(t, stageTestSize)
	e := f.put(t, data)

	// A workflow no worker runs still takes signals into its history.
	ctx := context.Background()
	wid := model.StageWorkflowID("node-a", e.SHA256) + ":" + t.Name()
	run, err := env.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: wid, TaskQueue: "staging-test-no-worker"}, model.StageWorkflowType)
	require.NoError(t, err)
	defer func() { _ = env.Temporal.TerminateWorkflow(ctx, wid, run.GetRunID(), "test over") }()

	_, err = f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e, WorkflowID: wid})
	require.NoError(t, err)

	var got []model.StageProgressSignal
	it := env.Temporal.GetWorkflowHistory(ctx, wid, run.GetRunID(), false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		require.NoError(t, err)
		attr := ev.GetWorkflowExecutionSignaledEventAttributes()
		if attr == nil {
			continue
		}
		assert.Equal(t, model.SignalStageProgress, attr.GetSignalName())
		var p model.StageProgressSignal
		require.NoError(t, env.DataConverter().FromPayloads(attr.GetInput(), &p))
		got = append(got, p)
	}
	require.NotEmpty(t, got)
	assert.LessOrEqual(t, len(got), 100/model.ProgressStepPercent)
	for i, p := range got {
		assert.Equal(t, e.Size, p.BytesTotal)
		assert.Positive(t, p.RateBytesPerSec)
		if i > 0 {
			assert.GreaterOrEqual(t, p.Percent/model.ProgressStepPercent, got[i-1].Percent/model.ProgressStepPercent+1, "one signal per step")
		}
	}
	assert.Equal(t, 100, got[len(got)-1].Percent)
	assert.Equal(t, e.Size, got[len(got)-1].BytesDone)
}

func TestStageModelChecksumMismatch(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, 2<<20)
	e := f.put(t, data)
	want := testenv.SHA256(testenv.RandomBytes(t, len(data)))
	e.SHA256 = want

	_, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	app := applicationError(t, err, model.ErrChecksumMismatch)
	assert.True(t, app.NonRetryable())
	assert.Contains(t, app.Error(), "expected sha256 "+want)
	assert.Contains(t, app.Error(), "got sha256 "+testenv.SHA256(data))
	assert.Contains(t, app.Error(), "node-a")
	f.assertNothingStaged(t, want)
	assert.Equal(t, 1.0, value(t, f.acts.Metrics.Failures.WithLabelValues("node-a", model.ErrChecksumMismatch)))

	// A size that cannot match fails before any byte is fetched.
	e.Size++
	_, err = f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	app = applicationError(t, err, model.ErrChecksumMismatch)
	assert.Contains(t, app.Error(), fmt.Sprintf("the object has %d bytes", len(data)))
	f.assertNothingStaged(t, want)
}

func TestStageModelDiskFull(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, 1<<20)
	e := f.put(t, data)
	f.acts.DiskMargin = 4096
	f.acts.FreeBytes = func() (uint64, error) { return 1000, nil }
	// A partial left by an earlier attempt goes too: nothing resumes it.
	require.NoError(t, os.MkdirAll(filepath.Dir(f.local.PartialPath(e.SHA256)), 0o755))
	require.NoError(t, os.WriteFile(f.local.PartialPath(e.SHA256), data[:4096], 0o644))

	_, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	app := applicationError(t, err, model.ErrDiskFull)
	assert.True(t, app.NonRetryable())
	msg := app.Error()
	assert.Contains(t, msg, fmt.Sprintf("needs %d bytes free", e.Size+4096))
	assert.Contains(t, msg, "has 1000")
	assert.Contains(t, msg, "node-a")
	assert.Contains(t, msg, e.ID)
	f.assertNothingStaged(t, e.SHA256)
	assert.Equal(t, 1.0, value(t, f.acts.Metrics.Failures.WithLabelValues("node-a", model.ErrDiskFull)))

	// What a partial already holds is not needed again.
	const k = 512 << 10
	require.NoError(t, os.WriteFile(f.local.PartialPath(e.SHA256), data[:k], 0o644))
	f.acts.FreeBytes = func() (uint64, error) { return uint64(e.Size - k + 4096), nil }
	res, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e}, func(a *testsuite.TestActivityEnvironment) {
		a.SetHeartbeatDetails(activities.StageProgress{Offset: k, HashState: hashState(t, data[:k])})
	})
	require.NoError(t, err)
	assert.Equal(t, e.Size-k, res.BytesTransferred)

	// Neither is what a partial that is about to be discarded holds.
	require.NoError(t, f.local.Remove(e.SHA256))
	require.NoError(t, os.WriteFile(f.local.PartialPath(e.SHA256), make([]byte, k), 0o644))
	f.acts.FreeBytes = func() (uint64, error) { return uint64(e.Size - k + 4096), nil }
	res, err = f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	require.NoError(t, err)
	assert.Equal(t, e.Size, res.BytesTransferred)
}

func TestStageModelBusyPartial(t *testing.T) {
	f := newStageFixture(t)
	data := testenv.RandomBytes(t, 1<<20)
	e := f.put(t, data)
	// An earlier attempt that timed out but still writes holds the lock.
	held, err := os.OpenFile(f.local.PartialPath(e.SHA256), os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	require.NoError(t, unix.Flock(int(held.Fd()), unix.LOCK_EX|unix.LOCK_NB))

	_, err = f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	app := applicationError(t, err, model.ErrStagingBusy)
	assert.False(t, app.NonRetryable())

	require.NoError(t, held.Close())
	res, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	require.NoError(t, err)
	assert.Equal(t, e.Size, res.BytesTransferred)
}

func TestStageModelObjectMissing(t *testing.T) {
	f := newStageFixture(t)
	sha := testenv.SHA256([]byte("never uploaded"))
	e := model.Entry{ID: "ghost", Key: "models/ghost-" + sha[:8] + ".gguf", SHA256: sha, Size: 1234}

	_, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	app := applicationError(t, err, model.ErrObjectMissing)
	assert.True(t, app.NonRetryable())
	assert.Contains(t, app.Error(), e.Key)
	f.assertNothingStaged(t, sha)
	assert.Equal(t, 1.0, value(t, f.acts.Metrics.Failures.WithLabelValues("node-a", model.ErrObjectMissing)))
}

func TestStageModelRefusesBadInput(t *testing.T) {
	f := newStageFixture(t)
	for _, e := range []model.Entry{
		{ID: "x", Key: "models/x.gguf", SHA256: "../../etc/passwd", Size: 1},
		{ID: "x", Key: "../x.gguf", SHA256: testenv.SHA256(nil), Size: 1},
		{ID: "x", Key: "models/x.gguf", SHA256: testenv.SHA256(nil), Size: 0},
	} {
		_, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
		applicationError(t, err, model.ErrInvalidStageInput)
	}
	ents, err := os.ReadDir(f.local.Dir)
	require.NoError(t, err)
	for _, e := range ents {
		assert.True(t, strings.HasPrefix(e.Name(), "."), "unexpected %s", e.Name())
	}
}
