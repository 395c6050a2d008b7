package activities_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

// nodePolicy is the nodes' policy that deploy/minio/init.sh gives MinIO, read
// out of that file (so the policy compose installs is the one tested), for
// bucket, as a bucket policy naming the node's account (versitygw holds
// bucket policies, not policies attached to users).
func nodePolicy(t *testing.T, bucket, account string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "deploy", "minio", "init.sh"))
	require.NoError(t, err)
	_, rest, ok := strings.Cut(string(raw), "cat > /tmp/llorch-node.json <<POLICY\n")
	require.True(t, ok, "init.sh writes /tmp/llorch-node.json")
	text, _, ok := strings.Cut(rest, "\nPOLICY\n")
	require.True(t, ok)
	var p struct {
		Version   string
		Statement []map[string]any
	}
	require.NoError(t, json.Unmarshal([]byte(strings.ReplaceAll(text, "$bucket", bucket)), &p))
	for _, st := range p.Statement {
		st["Principal"] = map[string]any{"AWS": []string{account}}
	}
	out, err := json.Marshal(p)
	require.NoError(t, err)
	return string(out)
}

func requireAccessDenied(t *testing.T, err error, what string) {
	t.Helper()
	var resp minio.ErrorResponse
	require.ErrorAs(t, err, &resp, what)
	require.Equal(t, "AccessDenied", resp.Code, "%s: %v", what, err)
}

// A node with the read-only account of the node policy stages a model (it
// reads), while every write it could try outside outputs/ (a model, a
// catalog entry, a delete) is refused with AccessDenied; a task output
// under outputs/ is written.
func TestNodeAccountStagesButCannotWriteModels(t *testing.T) {
	ctx := context.Background()
	const bucket = "llorch-models"
	s3 := testenv.StartAccountsS3(t, bucket)
	control, err := modelstore.New(s3.Root) // the control plane's read-write account
	require.NoError(t, err)
	require.NoError(t, control.EnsureBucket(ctx))
	nodeCfg := s3.User(t, "node-a")
	require.NoError(t, control.Client.SetBucketPolicy(ctx, bucket, nodePolicy(t, bucket, "node-a")))

	data := testenv.RandomBytes(t, 1<<20)
	sha := testenv.SHA256(data)
	e := model.Entry{ID: "priv-tiny", Key: "models/priv-tiny.gguf", SHA256: sha, Size: int64(len(data)), Lifecycle: model.Active}
	_, err = control.Client.PutObject(ctx, bucket, e.Key, bytes.NewReader(data), e.Size, minio.PutObjectOptions{})
	require.NoError(t, err)
	require.NoError(t, control.PutEntry(ctx, e))

	node, err := modelstore.New(nodeCfg)
	require.NoError(t, err)
	local, err := modelstore.NewLocalCatalog(filepath.Join(t.TempDir(), "models"))
	require.NoError(t, err)
	f := &stageFixture{store: node, local: local, acts: &activities.StagingActivities{
		Store: node, Local: local, Metrics: activities.NewStagingMetrics(prometheus.NewRegistry()),
		DiskMargin: 1 << 20, CheckpointEvery: 10 * time.Millisecond,
	}}
	res, err := f.stage(t, activities.StageInput{NodeID: "node-a", Entry: e})
	require.NoError(t, err, "the node's account reads models")
	got, err := os.ReadFile(res.Path)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got))
	read, err := node.GetEntry(ctx, e.ID)
	require.NoError(t, err, "and the catalog")
	require.Equal(t, sha, read.SHA256)

	evil := []byte("not the model")
	_, err = node.Client.PutObject(ctx, bucket, e.Key, bytes.NewReader(evil), int64(len(evil)), minio.PutObjectOptions{})
	requireAccessDenied(t, err, "overwrite a model")
	_, err = node.Client.PutObject(ctx, bucket, "models/new.gguf", bytes.NewReader(evil), int64(len(evil)), minio.PutObjectOptions{})
	requireAccessDenied(t, err, "add a model")
	requireAccessDenied(t, node.PutEntry(ctx, model.Entry{ID: "evil", Key: e.Key, SHA256: sha, Size: 1, Lifecycle: model.Active}), "write the catalog")
	requireAccessDenied(t, node.Client.RemoveObject(ctx, bucket, e.Key, minio.RemoveObjectOptions{}), "delete a model")
	requireAccessDenied(t, node.DeleteEntry(ctx, e.ID), "delete a catalog entry")
	after, err := control.Client.StatObject(ctx, bucket, e.Key, minio.StatObjectOptions{})
	require.NoError(t, err)
	require.Equal(t, e.Size, after.Size, "the model is untouched")

	out := []byte("a long task output")
	_, err = node.Client.PutObject(ctx, bucket, "outputs/t-1.json", bytes.NewReader(out), int64(len(out)), minio.PutObjectOptions{})
	require.NoError(t, err, "nodes write task outputs under outputs/")
}
