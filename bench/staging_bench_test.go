package bench

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

var env *testenv.Env

// TestMain starts the services only when benchmarks run: `go test ./...`
// passes through here without them.
func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.bench"); f == nil || f.Value.String() == "" {
		os.Exit(m.Run())
	}
	testenv.Main(m, &env)
}

var stageSize = flag.Int64("stage-size", 256<<20, "object size for BenchmarkStaging")

// BenchmarkStaging stages an object from versitygw onto a node's disk
// (ranged GET, sha256, fsync, atomic rename, provenance) and, in the same
// iteration, downloads the same object with a bare minio-go FGetObject.
// It reports both rates and their ratio (aim: >= 0.9).
func BenchmarkStaging(b *testing.B) {
	ctx := context.Background()
	store, err := modelstore.New(env.S3)
	require.NoError(b, err)
	require.NoError(b, store.EnsureBucket(ctx))
	key := fmt.Sprintf("bench/%d.bin", *stageSize)
	sha, err := store.Upload(ctx, io.LimitReader(rand.Reader, *stageSize), *stageSize, key, nil)
	require.NoError(b, err)
	entry := model.Entry{ID: "bench", Key: key, SHA256: sha, Size: *stageSize}

	var stageTime, fgetTime, durableTime time.Duration
	fget := func(dir string) {
		require.NoError(b, store.Client.FGetObject(ctx, store.Bucket, key, filepath.Join(dir, "fget.bin"), minio.GetObjectOptions{}))
	}
	durable := func(dir string) {
		path := filepath.Join(dir, "fget-durable.bin")
		require.NoError(b, store.Client.FGetObject(ctx, store.Bucket, key, path, minio.GetObjectOptions{}))
		f, err := os.Open(path)
		require.NoError(b, err)
		require.NoError(b, f.Sync())
		f.Close()
	}
	stage := func(dir string) {
		local, err := modelstore.NewLocalCatalog(filepath.Join(dir, "catalog"))
		require.NoError(b, err)
		a := &activities.StagingActivities{Store: store, Local: local, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		var ts testsuite.WorkflowTestSuite
		aenv := ts.NewTestActivityEnvironment()
		aenv.RegisterActivity(a)
		_, err = aenv.ExecuteActivity(a.StageModel, activities.StageInput{NodeID: "bench", Entry: entry})
		require.NoError(b, err)
	}
	runs := []struct {
		fn  func(string)
		sum *time.Duration
	}{{stage, &stageTime}, {fget, &fgetTime}, {durable, &durableTime}}
	b.SetBytes(*stageSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// The order turns each iteration: whoever runs after a few hundred
		// MB were written finds the disk's writeback slower.
		for j := range runs {
			r := runs[(i+j)%len(runs)]
			dir, err := os.MkdirTemp(b.TempDir(), "run")
			require.NoError(b, err)
			// Each download starts with no dirty pages left by another, so
			// no one pays for someone else's writeback.
			syscall.Sync()
			start := time.Now()
			r.fn(dir)
			*r.sum += time.Since(start)
			b.StopTimer()
			require.NoError(b, os.RemoveAll(dir))
			b.StartTimer()
		}
	}
	b.StopTimer()
	mbps := func(d time.Duration) float64 { return float64(*stageSize) * float64(b.N) / d.Seconds() / 1e6 }
	b.ReportMetric(mbps(stageTime), "llorch-MB/s")
	b.ReportMetric(mbps(fgetTime), "fget-MB/s")
	b.ReportMetric(mbps(durableTime), "fget+fsync-MB/s")
	b.ReportMetric(fgetTime.Seconds()/stageTime.Seconds(), "ratio-vs-fget")
	b.ReportMetric(durableTime.Seconds()/stageTime.Seconds(), "ratio-vs-fget+fsync")
	report(b, "staging", map[string]any{"iterations": b.N, "size_mib": *stageSize >> 20,
		"llorch_mb_s": mbps(stageTime), "fget_mb_s": mbps(fgetTime), "fget_fsync_mb_s": mbps(durableTime),
		"ratio_vs_fget": fgetTime.Seconds() / stageTime.Seconds(), "ratio_vs_fget_fsync": durableTime.Seconds() / stageTime.Seconds()})
	b.Logf("%d MiB x %d: llorch staging %.0f MB/s (ranged GET, sha256, fsync, rename); FGetObject %.0f MB/s (ratio %.2f); FGetObject+fsync %.0f MB/s (ratio %.2f)",
		*stageSize>>20, b.N, mbps(stageTime), mbps(fgetTime), fgetTime.Seconds()/stageTime.Seconds(),
		mbps(durableTime), durableTime.Seconds()/stageTime.Seconds())
}
