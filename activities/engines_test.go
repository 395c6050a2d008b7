package activities_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/workers/engines"
)

// fakeHost is an EngineHost with fixed figures.
type fakeHost struct {
	snap node.Snapshot
	inv  node.Inventory
}

func (h fakeHost) Snapshot() node.Snapshot     { return h.snap }
func (h fakeHost) Inventory() node.Inventory   { return h.inv }
func (h fakeHost) ProcessGPUMemory(int) uint64 { return 0 }

type engineFixture struct {
	acts  *activities.EngineActivities
	local *modelstore.LocalCatalog
	sha   string
}

// commitModel puts data in the local catalog and returns its sha256.
func commitModel(t *testing.T, local *modelstore.LocalCatalog, id string, data []byte) string {
	t.Helper()
	sha := testenv.SHA256(data)
	require.NoError(t, os.WriteFile(local.PartialPath(sha), data, 0o644))
	require.NoError(t, local.Commit(sha, modelstore.Provenance{ModelID: id, Key: "models/" + id + ".gguf", Size: int64(len(data))}))
	return sha
}

func tinyGGUF(t *testing.T) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, modelstore.WriteTinyFile(p, modelstore.TinyOptions{}))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return b
}

func newEngineFixture(t *testing.T) *engineFixture {
	t.Helper()
	lib := testenv.LlamaLib(t)
	local, err := modelstore.NewLocalCatalog(filepath.Join(t.TempDir(), "models"))
	require.NoError(t, err)
	sha := commitModel(t, local, "tiny", tinyGGUF(t))
	f := &engineFixture{local: local, sha: sha, acts: &activities.EngineActivities{
		NodeID: "node-e",
		Table: &engines.Table{
			NodeID:     "node-e",
			RuntimeDir: t.TempDir(),
			LlorchBin:  testenv.Llorch(t),
			LibDir:     lib,
			Threads:    1,
			Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		},
		Local: local,
		Host:  fakeHost{},
	}}
	return f
}

// freshWorker is the engine activities of a worker that restarted: the same
// node and runtime dir, none of the engines in memory.
func (f *engineFixture) freshWorker() *activities.EngineActivities {
	a, tab := f.acts, f.acts.Table
	return &activities.EngineActivities{
		NodeID: a.NodeID, Local: a.Local, Host: a.Host,
		Table: &engines.Table{NodeID: tab.NodeID, RuntimeDir: tab.RuntimeDir, LlorchBin: tab.LlorchBin, LibDir: tab.LibDir, Threads: 1, Log: tab.Log},
	}
}

var poolSeq struct {
	sync.Mutex
	n int
}

func (f *engineFixture) spec(t *testing.T) pool.Spec {
	poolSeq.Lock()
	poolSeq.n++
	id := fmt.Sprintf("p%d-%d", os.Getpid()%100000, poolSeq.n)
	poolSeq.Unlock()
	// Whatever a test leaves running, stop it.
	t.Cleanup(func() { _ = f.acts.StopEngine(context.Background(), activities.StopInput{PoolID: id}) })
	return pool.Spec{PoolID: id, NodeID: f.acts.NodeID, ModelID: "tiny", Engine: pool.Builtin, CtxSize: 256, Slots: 2}
}

// exec runs one activity in a fresh test environment.
func (f *engineFixture) exec(t *testing.T, fn any, in any, opts ...func(*testsuite.TestActivityEnvironment)) (converterValue, error) {
	t.Helper()
	var s testsuite.WorkflowTestSuite
	aenv := s.NewTestActivityEnvironment()
	aenv.RegisterActivity(f.acts)
	aenv.SetTestTimeout(2 * time.Minute)
	for _, o := range opts {
		o(aenv)
	}
	v, err := aenv.ExecuteActivity(fn, in)
	return converterValue{v}, err
}

type converterValue struct{ v converter.EncodedValue }

func (c converterValue) get(t *testing.T, out any) {
	t.Helper()
	require.NotNil(t, c.v)
	require.NoError(t, c.v.Get(out))
}

func (f *engineFixture) start(t *testing.T, spec pool.Spec, epoch int64) pool.Handoff {
	t.Helper()
	v, err := f.exec(t, f.acts.StartEngine, activities.StartInput{Spec: spec, SHA256: f.sha, Epoch: epoch})
	require.NoError(t, err)
	var h pool.Handoff
	v.get(t, &h)
	pid := h.PID
	t.Cleanup(func() { killPid(pid) })
	return h
}

// killPid is the last resort of a cleanup: SIGKILL pid if it still runs an engine.
func killPid(pid int) {
	if pid > 0 && testenv.Alive(pid) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func httpStatus(t *testing.T, url string) int {
	t.Helper()
	res, err := (&http.Client{Timeout: 2 * time.Second}).Get(url)
	if err != nil {
		return 0
	}
	res.Body.Close()
	return res.StatusCode
}

func TestPreflightCPUAndErrors(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	_, err := f.exec(t, f.acts.Preflight, activities.PreflightInput{Spec: spec, SHA256: f.sha})
	require.NoError(t, err)

	unknown := strings.Repeat("ab", 32)
	_, err = f.exec(t, f.acts.Preflight, activities.PreflightInput{Spec: spec, SHA256: unknown})
	app := applicationError(t, err, pool.ErrModelNotStaged)
	assert.True(t, app.NonRetryable())

	f.acts.Host = fakeHost{snap: node.Snapshot{GPUs: []node.GPUUsage{
		{Index: 0, MemoryTotalBytes: 8 << 30, MemoryFreeBytes: 1 << 20},
	}}}
	gpu := spec
	gpu.DeviceMask = "0"
	gpu.NGPULayers = 99
	_, err = f.exec(t, f.acts.Preflight, activities.PreflightInput{Spec: gpu, SHA256: f.sha})
	app = applicationError(t, err, pool.ErrInsufficientVRAM)
	assert.True(t, app.NonRetryable())
	assert.Contains(t, app.Error(), "bytes of VRAM on GPUs [0], 1048576 free")

	gpu.DeviceMask = "0,3"
	_, err = f.exec(t, f.acts.Preflight, activities.PreflightInput{Spec: gpu, SHA256: f.sha})
	app = applicationError(t, err, pool.ErrInsufficientVRAM)
	assert.Contains(t, app.Error(), "GPU 3, which this node does not have")

	// Plenty of VRAM passes; a mask with NGPULayers 0 is a CPU pool.
	f.acts.Host = fakeHost{snap: node.Snapshot{GPUs: []node.GPUUsage{{Index: 0, MemoryFreeBytes: 64 << 30}}}}
	gpu.DeviceMask = "0"
	_, err = f.exec(t, f.acts.Preflight, activities.PreflightInput{Spec: gpu, SHA256: f.sha})
	require.NoError(t, err)
}

func TestEngineStartServesAndFencesOlderEpoch(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 1)

	assert.Equal(t, pool.Builtin, h.Engine)
	assert.NotEmpty(t, h.EngineVersion)
	assert.Equal(t, spec.PoolID, h.PoolID)
	assert.Equal(t, "node-e/"+spec.PoolID+"/1", h.ReplicaID)
	assert.Equal(t, pool.HandoffModel{ID: "tiny", Path: f.local.Path(f.sha), SHA256: f.sha}, h.Model)
	assert.Equal(t, 2, h.Slots)
	assert.Equal(t, int64(1), h.Epoch)
	assert.False(t, h.StartedAt.IsZero())
	assert.True(t, testenv.Alive(h.PID), "engine runs after the activity returned")
	assert.Equal(t, http.StatusOK, httpStatus(t, h.URL+"/health"))

	res, err := http.Post(h.URL+"/completion", "application/json",
		strings.NewReader(`{"prompt":"Hello there","n_predict":4,"temperature":0}`))
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode, string(body))
	assert.Contains(t, string(body), `"content"`)

	b, err := os.ReadFile(pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID))
	require.NoError(t, err)
	var onDisk pool.Handoff
	require.NoError(t, json.Unmarshal(b, &onDisk))
	assert.True(t, onDisk.StartedAt.Equal(h.StartedAt))
	onDisk.StartedAt = h.StartedAt
	assert.Equal(t, h, onDisk)

	h2 := f.start(t, spec, 2)
	assert.False(t, testenv.Alive(h.PID), "epoch 1 engine fenced")
	assert.NotEqual(t, h.URL, h2.URL)
	assert.True(t, testenv.Alive(h2.PID))
	assert.Equal(t, http.StatusOK, httpStatus(t, h2.URL+"/health"))
	require.NoError(t, json.Unmarshal(mustRead(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID)), &onDisk))
	assert.Equal(t, int64(2), onDisk.Epoch)
	assert.Equal(t, h2.PID, onDisk.PID)

	// A stop of the older epoch leaves the newer engine alone.
	require.NoError(t, f.acts.StopEngine(context.Background(), activities.StopInput{PoolID: spec.PoolID, Epoch: 1}))
	assert.True(t, testenv.Alive(h2.PID))
	require.NoError(t, f.acts.StopEngine(context.Background(), activities.StopInput{PoolID: spec.PoolID, Epoch: 2}))
	assert.False(t, testenv.Alive(h2.PID))
	assert.NoFileExists(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID))
	require.NoError(t, f.acts.StopEngine(context.Background(), activities.StopInput{PoolID: spec.PoolID, Epoch: 2}), "idempotent")
}

func TestEngineFencesEngineOfEarlierWorker(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 1)
	// A fresh worker (no in-memory engines) finds the handoff file.
	fresh := f.freshWorker()
	f2 := &engineFixture{acts: fresh, local: f.local, sha: f.sha}
	t.Cleanup(func() { _ = fresh.StopEngine(context.Background(), activities.StopInput{PoolID: spec.PoolID}) })
	h2 := f2.start(t, spec, 2)
	assert.False(t, testenv.Alive(h.PID), "engine of the earlier worker fenced")
	assert.True(t, testenv.Alive(h2.PID))
}

// A reload starts the new epoch beside the serving one (Keep); the handoff
// switches to the new engine once it is healthy; stopping the old epoch
// leaves the new one serving.
func TestEngineStartKeepsServingEpoch(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h1 := f.start(t, spec, 1)
	v, err := f.exec(t, f.acts.StartEngine, activities.StartInput{Spec: spec, SHA256: f.sha, Epoch: 2, Keep: 1})
	require.NoError(t, err)
	var h2 pool.Handoff
	v.get(t, &h2)
	t.Cleanup(func() { killPid(h2.PID) })
	assert.True(t, testenv.Alive(h1.PID), "the serving engine is kept")
	assert.True(t, testenv.Alive(h2.PID))
	var onDisk pool.Handoff
	require.NoError(t, json.Unmarshal(mustRead(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID)), &onDisk))
	assert.Equal(t, int64(2), onDisk.Epoch, "the handoff names the new engine")
	require.NoError(t, f.acts.StopEngine(context.Background(), activities.StopInput{PoolID: spec.PoolID, Epoch: 1}))
	assert.False(t, testenv.Alive(h1.PID))
	assert.True(t, testenv.Alive(h2.PID))
	assert.FileExists(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID), "the new engine's handoff stays")
}

// A worker that restarts adopts the engine of the epoch its pool still
// owns: it supervises it like its own, sees it exit, and the engine's
// listing in /proc names pool and epoch.
func TestEngineAdoptedByFreshWorker(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 3)
	fresh := f.freshWorker()
	require.Contains(t, fresh.Table.Live(), engines.Live{PoolID: spec.PoolID, Epoch: 3, PID: h.PID})
	wrong := h
	wrong.Epoch = 2
	require.Error(t, fresh.Table.Adopt(wrong), "an epoch the process does not carry")
	other := &engines.Table{NodeID: "node-other", RuntimeDir: f.acts.Table.RuntimeDir}
	require.Error(t, other.Adopt(h), "another node's engine")
	require.NoError(t, fresh.Table.Adopt(h))

	f2 := &engineFixture{acts: fresh, local: f.local, sha: f.sha}
	var once sync.Once
	v, err := f2.exec(t, fresh.Supervise, activities.SuperviseInput{PoolID: spec.PoolID, Epoch: 3, URL: h.URL, PID: h.PID},
		func(aenv *testsuite.TestActivityEnvironment) {
			aenv.SetOnActivityHeartbeatListener(func(_ *activity.Info, d converter.EncodedValues) {
				var live activities.EngineLive
				if d.Get(&live) == nil && live.Healthy && live.RSSBytes > 0 {
					once.Do(func() { _ = syscall.Kill(h.PID, syscall.SIGKILL) })
				}
			})
		})
	require.NoError(t, err)
	var res activities.SuperviseResult
	v.get(t, &res)
	assert.True(t, res.Exited)
	assert.Equal(t, -1, res.ExitCode, "an adopted engine's exit code is unknown")
	assert.False(t, testenv.Alive(h.PID))
}

// With no supervisor renewing its lease (its worker died and never came
// back), a built-in engine exits by itself: no orphan.
func TestEngineExitsWhenLeaseLapses(t *testing.T) {
	f := newEngineFixture(t)
	f.acts.Table.OrphanTimeout = 3 * time.Second
	spec := f.spec(t)
	h := f.start(t, spec, 1)
	testenv.Eventually(t, time.Minute, "engine exits once its lease lapses", func() (bool, string) {
		return !testenv.Alive(h.PID), fmt.Sprint(h.PID)
	})
	assert.Contains(t, string(mustRead(t, filepath.Join(f.acts.Table.RuntimeDir, "engines", spec.PoolID+"@1.log"))), "no supervisor for")
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return b
}

func TestSuperviseReportsEngineExit(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 1)

	var beats sync.WaitGroup
	beats.Add(1)
	var once sync.Once
	go func() {
		beats.Wait() // Supervise has seen the engine healthy
		_ = syscall.Kill(h.PID, syscall.SIGKILL)
	}()
	v, err := f.exec(t, f.acts.Supervise, activities.SuperviseInput{PoolID: spec.PoolID, Epoch: 1, URL: h.URL, PID: h.PID},
		func(aenv *testsuite.TestActivityEnvironment) {
			aenv.SetOnActivityHeartbeatListener(func(_ *activity.Info, d converter.EncodedValues) {
				var live activities.EngineLive
				if d.Get(&live) == nil && live.Healthy && live.SlotsTotal == 2 && live.SlotsFree == 2 {
					once.Do(beats.Done)
				}
			})
		})
	require.NoError(t, err)
	var res activities.SuperviseResult
	v.get(t, &res)
	assert.True(t, res.Exited)
	assert.Equal(t, 128+int(syscall.SIGKILL), res.ExitCode)
	assert.Contains(t, res.Reason, "engine exited with code 137")
	assert.NotEmpty(t, res.LogTail)
	assert.Positive(t, res.UptimeMs)

	// A worker that did not start this engine has nothing to supervise.
	v, err = f.exec(t, f.acts.Supervise, activities.SuperviseInput{PoolID: spec.PoolID, Epoch: 7, URL: h.URL, PID: h.PID})
	require.NoError(t, err)
	v.get(t, &res)
	assert.True(t, res.Exited)
	assert.Contains(t, res.Reason, "worker restarted")
}

func TestSuperviseKillsEngineThatStopsAnswering(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 1)
	// A stopped process keeps its port open but never answers /health.
	require.NoError(t, syscall.Kill(h.PID, syscall.SIGSTOP))
	v, err := f.exec(t, f.acts.Supervise, activities.SuperviseInput{PoolID: spec.PoolID, Epoch: 1, URL: h.URL, PID: h.PID})
	require.NoError(t, err)
	var res activities.SuperviseResult
	v.get(t, &res)
	assert.True(t, res.Exited)
	assert.Contains(t, res.Reason, "health check failed 3 times")
	assert.Equal(t, 128+int(syscall.SIGKILL), res.ExitCode, "SIGTERM cannot reach a stopped process: SIGKILL after the grace")
	assert.False(t, testenv.Alive(h.PID))
}

func TestSuperviseCancelStopsEngine(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	h := f.start(t, spec, 1)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var once sync.Once
	done := make(chan struct{})
	go func() {
		_, _ = f.exec(t, f.acts.Supervise, activities.SuperviseInput{PoolID: spec.PoolID, Epoch: 1, URL: h.URL, PID: h.PID},
			func(aenv *testsuite.TestActivityEnvironment) {
				aenv.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctx})
				aenv.SetOnActivityHeartbeatListener(func(_ *activity.Info, d converter.EncodedValues) {
					once.Do(cancel) // supervising: now drain
				})
			})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("Supervise did not return after its context was cancelled")
	}
	assert.False(t, testenv.Alive(h.PID), "engine stopped")
	assert.NoFileExists(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID))
}

func TestEngineStartCorruptModelFails(t *testing.T) {
	f := newEngineFixture(t)
	data := tinyGGUF(t)
	bad := data[:len(data)/2]
	sha := commitModel(t, f.local, "broken", bad)
	spec := f.spec(t)
	spec.ModelID = "broken"

	_, err := f.exec(t, f.acts.StartEngine, activities.StartInput{Spec: spec, SHA256: sha, Epoch: 1})
	app := applicationError(t, err, pool.ErrEngineStart)
	assert.True(t, app.NonRetryable())
	assert.Contains(t, app.Error(), "engine exited with code")
	assert.Contains(t, app.Error(), "last log lines")
	logTail := mustRead(t, filepath.Join(f.acts.Table.RuntimeDir, "engines", spec.PoolID+"@1.log"))
	require.NotEmpty(t, logTail)
	lines := strings.Split(strings.TrimSpace(string(logTail)), "\n")
	assert.Contains(t, app.Error(), lines[len(lines)-1], "message carries the log tail")
	assert.NoFileExists(t, pool.HandoffPath(f.acts.Table.RuntimeDir, spec.PoolID))
	assert.Empty(t, testenv.EnginePIDs(spec.PoolID), "no engine process left")
}

func TestEngineLlamaServerNotInstalled(t *testing.T) {
	f := newEngineFixture(t)
	spec := f.spec(t)
	spec.Engine = pool.LlamaServer
	_, err := f.exec(t, f.acts.StartEngine, activities.StartInput{Spec: spec, SHA256: f.sha, Epoch: 1})
	app := applicationError(t, err, pool.ErrEngineStart)
	assert.Contains(t, app.Error(), "llama-server is not installed on node node-e")
}
