package modelstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"

	"github.com/llorch/llorch/testenv"
)

// newTestStore connects to the package's versitygw and makes sure the
// bucket exists (testenv does not create it).
func newTestStore(t *testing.T) *modelstore.Store {
	t.Helper()
	s, err := modelstore.New(env.S3)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, s.EnsureBucket(ctx))
	require.NoError(t, s.EnsureBucket(ctx), "EnsureBucket is idempotent")
	return s
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestStoreNewRefusesIncompleteConfig(t *testing.T) {
	cfg := env.S3
	cfg.Endpoint = ""
	_, err := modelstore.New(cfg)
	require.ErrorContains(t, err, "endpoint")
	cfg = env.S3
	cfg.Bucket = ""
	_, err = modelstore.New(cfg)
	require.ErrorContains(t, err, "bucket")
}

func TestCatalogCRUD(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	created := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	entry := func(id string, size int64) model.Entry {
		return model.Entry{
			ID: id, Key: model.DefaultKey(id), SHA256: testenv.SHA256([]byte(id)), Size: size,
			Metadata: model.Metadata{Architecture: "llama", Parameters: 8_030_000_000, ContextLength: 8192,
				Quantization: "Q4_K_M", Layers: 32},
			Lifecycle: model.Active, CreatedAt: created, VerifiedAt: created.Add(time.Minute),
		}
	}
	b, a := entry("crud-b-7b", 2), entry("crud-a-8b.q4", 1)
	require.NoError(t, s.PutEntry(ctx, b))
	require.NoError(t, s.PutEntry(ctx, a))

	got, err := s.GetEntry(ctx, a.ID)
	require.NoError(t, err)
	require.Equal(t, a, got)

	// The entry is a JSON object at EntryKey, readable without this package.
	info, err := s.Stat(ctx, model.EntryKey(a.ID))
	require.NoError(t, err)
	require.Equal(t, "application/json", info.ContentType)

	list, err := s.ListEntries(ctx)
	require.NoError(t, err)
	var ids []string
	for _, e := range list {
		if strings.HasPrefix(e.ID, "crud-") {
			ids = append(ids, e.ID)
		}
	}
	require.Equal(t, []string{a.ID, b.ID}, ids, "sorted by id")

	// Put replaces.
	a.Lifecycle = model.Retired
	require.NoError(t, s.PutEntry(ctx, a))
	got, err = s.GetEntry(ctx, a.ID)
	require.NoError(t, err)
	require.Equal(t, model.Retired, got.Lifecycle)

	require.NoError(t, s.DeleteEntry(ctx, a.ID))
	_, err = s.GetEntry(ctx, a.ID)
	require.ErrorIs(t, err, modelstore.ErrEntryNotFound)
	require.ErrorContains(t, err, a.ID)
	require.ErrorIs(t, s.DeleteEntry(ctx, a.ID), modelstore.ErrEntryNotFound)
	_, err = s.GetEntry(ctx, "crud-never")
	require.ErrorIs(t, err, modelstore.ErrEntryNotFound)

	list, err = s.ListEntries(ctx)
	require.NoError(t, err)
	for _, e := range list {
		require.NotEqual(t, a.ID, e.ID)
	}
	require.NoError(t, s.DeleteEntry(ctx, b.ID))
}

func TestCatalogRefusesInvalidEntries(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	good := model.Entry{ID: "ok", Key: "models/ok.gguf", SHA256: testenv.SHA256(nil), Size: 1}
	for name, mutate := range map[string]func(*model.Entry){
		"upper-case id": func(e *model.Entry) { e.ID = "Llama" },
		"traversal id":  func(e *model.Entry) { e.ID = "../x" },
		"empty id":      func(e *model.Entry) { e.ID = "" },
		"catalog key":   func(e *model.Entry) { e.Key = "catalog/ok.json" },
		"absolute key":  func(e *model.Entry) { e.Key = "/models/ok.gguf" },
		"short sha":     func(e *model.Entry) { e.SHA256 = "abc" },
		"negative size": func(e *model.Entry) { e.Size = -1 },
	} {
		e := good
		mutate(&e)
		require.Error(t, s.PutEntry(ctx, e), name)
	}
	for _, id := range []string{"Llama", "../x", "", "a/b"} {
		_, err := s.GetEntry(ctx, id)
		require.Error(t, err, id)
		require.NotErrorIs(t, err, modelstore.ErrEntryNotFound, "invalid id %q is refused, not looked up", id)
		require.Error(t, s.DeleteEntry(ctx, id), id)
	}
}

func TestUploadMultipartHashesWhileSending(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	data := testenv.RandomBytes(t, 24<<20)
	want := testenv.SHA256(data)
	key := "models/upload-multipart.gguf"
	var seen byteCounter
	got, err := s.Upload(ctx, bytes.NewReader(data), int64(len(data)), key, &seen, modelstore.PartSize(5<<20))
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.Equal(t, int64(len(data)), int64(seen), "progress sees every byte once")

	info, err := s.Stat(ctx, key)
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), info.Size)
	require.Equal(t, "application/octet-stream", info.ContentType)
	// A multipart ETag is "<md5 of the part md5s>-<parts>": 24 MiB in 5 MiB parts is 5.
	require.True(t, strings.HasSuffix(info.ETag, "-5"), "multipart ETag %q", info.ETag)

	sha, size, err := s.HashObject(ctx, key)
	require.NoError(t, err)
	require.Equal(t, want, sha)
	require.Equal(t, int64(len(data)), size)
	require.NoError(t, s.Remove(ctx, key))
	_, err = s.Stat(ctx, key)
	require.ErrorIs(t, err, modelstore.ErrObjectMissing)
}

func TestUploadUnknownSizeAndMetadata(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	data := testenv.RandomBytes(t, 11<<20)
	key := "models/upload-unknown-size.gguf"
	got, err := s.Upload(ctx, io.MultiReader(bytes.NewReader(data)), -1, key, nil,
		modelstore.PartSize(5<<20), modelstore.UserMetadata(map[string]string{"sha256": testenv.SHA256(data)}))
	require.NoError(t, err)
	require.Equal(t, testenv.SHA256(data), got)
	info, err := s.Stat(ctx, key)
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), info.Size)
	require.Equal(t, testenv.SHA256(data), info.UserMetadata["Sha256"], "metadata %v", info.UserMetadata)

	// A small object goes in one PUT.
	small := []byte("tiny model")
	got, err = s.Upload(ctx, bytes.NewReader(small), int64(len(small)), "models/upload-small.gguf", nil)
	require.NoError(t, err)
	require.Equal(t, testenv.SHA256(small), got)
	sha, size, err := s.HashObject(ctx, "models/upload-small.gguf")
	require.NoError(t, err)
	require.Equal(t, testenv.SHA256(small), sha)
	require.Equal(t, int64(len(small)), size)
}

// byteCounter counts what an upload's progress writer sees.
type byteCounter int64

func (c *byteCounter) Write(p []byte) (int, error) {
	*c += byteCounter(len(p))
	return len(p), nil
}

// failingReader gives n bytes of data, then an error.
type failingReader struct {
	r   io.Reader
	n   int64
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, f.err
	}
	if int64(len(p)) > f.n {
		p = p[:f.n]
	}
	k, err := f.r.Read(p)
	f.n -= int64(k)
	return k, err
}

func TestUploadFailingMidwayLeavesNoObject(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	data := testenv.RandomBytes(t, 16<<20)
	boom := errors.New("disk read error")
	for _, tc := range []struct {
		name     string
		size     int64
		failAt   int64
		partSize uint64
	}{
		{"multipart, fails in the third part", int64(len(data)), 12 << 20, 5 << 20},
		{"multipart of unknown size", -1, 7 << 20, 5 << 20},
		{"single put", int64(len(data)), 3 << 20, 0},
		{"reader shorter than the size", int64(len(data)) + 1, int64(len(data)), 5 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "models/upload-fails-" + strings.ReplaceAll(tc.name, " ", "-") + ".gguf"
			fail := boom
			if tc.failAt == int64(len(data)) {
				fail = io.EOF
			}
			r := &failingReader{r: bytes.NewReader(data), n: tc.failAt, err: fail}
			var opts []modelstore.UploadOption
			if tc.partSize > 0 {
				opts = append(opts, modelstore.PartSize(tc.partSize))
			}
			_, err := s.Upload(ctx, r, tc.size, key, nil, opts...)
			require.Error(t, err)
			if fail == boom {
				require.ErrorContains(t, err, boom.Error())
			}
			_, err = s.Stat(ctx, key)
			require.ErrorIs(t, err, modelstore.ErrObjectMissing)
			requireNoIncompleteUpload(t, s, key)
		})
	}

	// A failed replace keeps the object that was there.
	key := "models/upload-fails-keeps-old.gguf"
	old := []byte("the old, good model")
	_, err := s.Upload(ctx, bytes.NewReader(old), int64(len(old)), key, nil)
	require.NoError(t, err)
	_, err = s.Upload(ctx, &failingReader{r: bytes.NewReader(data), n: 6 << 20, err: boom}, int64(len(data)), key, nil, modelstore.PartSize(5<<20))
	require.ErrorContains(t, err, boom.Error())
	sha, _, err := s.HashObject(ctx, key)
	require.NoError(t, err)
	require.Equal(t, testenv.SHA256(old), sha)

	// A cancelled upload leaves nothing either.
	cctx, cancel := context.WithCancel(ctx)
	key = "models/upload-cancelled.gguf"
	r := &failingReader{r: bytes.NewReader(data), n: int64(len(data))}
	pr, pw := io.Pipe()
	go func() {
		_, _ = io.CopyN(pw, r, 7<<20)
		cancel()
		_, _ = io.Copy(pw, r)
		pw.Close()
	}()
	_, err = s.Upload(cctx, pr, int64(len(data)), key, nil, modelstore.PartSize(5<<20))
	require.Error(t, err)
	_, err = s.Stat(ctx, key)
	require.ErrorIs(t, err, modelstore.ErrObjectMissing)
}

// requireNoIncompleteUpload checks that no multipart upload of key is left
// (its parts would hold disk space on the store).
func requireNoIncompleteUpload(t *testing.T, s *modelstore.Store, key string) {
	t.Helper()
	for u := range s.Client.ListIncompleteUploads(testCtx(t), s.Bucket, key, false) {
		require.NoError(t, u.Err)
		if u.Key == key {
			t.Fatalf("incomplete multipart upload %s of %s left behind", u.UploadID, key)
		}
	}
}

func TestUploadIncompleteUploadsAreListed(t *testing.T) {
	// Proves that requireNoIncompleteUpload can see an abandoned upload.
	s := newTestStore(t)
	ctx := testCtx(t)
	core := minio.Core{Client: s.Client}
	key := "models/probe-incomplete.gguf"
	id, err := core.NewMultipartUpload(ctx, s.Bucket, key, minio.PutObjectOptions{})
	require.NoError(t, err)
	var found bool
	for u := range s.Client.ListIncompleteUploads(ctx, s.Bucket, key, false) {
		require.NoError(t, u.Err)
		found = found || u.UploadID == id
	}
	require.True(t, found, "upload %s not listed", id)
	require.NoError(t, core.AbortMultipartUpload(ctx, s.Bucket, key, id))
	requireNoIncompleteUpload(t, s, key)
}

func TestStatMissingObject(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	_, err := s.Stat(ctx, "models/never-uploaded.gguf")
	require.ErrorIs(t, err, modelstore.ErrObjectMissing)
	require.ErrorContains(t, err, s.Bucket+"/models/never-uploaded.gguf")
	_, _, err = s.HashObject(ctx, "models/never-uploaded.gguf")
	require.ErrorIs(t, err, modelstore.ErrObjectMissing)
}

func TestPresignGetFetchable(t *testing.T) {
	s := newTestStore(t)
	ctx := testCtx(t)
	data := testenv.RandomBytes(t, 1<<20+17)
	key := "models/presign.gguf"
	_, err := s.Upload(ctx, bytes.NewReader(data), int64(len(data)), key, nil)
	require.NoError(t, err)

	u, err := s.PresignGet(ctx, key, 5*time.Minute)
	require.NoError(t, err)
	require.Contains(t, u, "X-Amz-Signature=")
	fetch := func(u string) (int, []byte) {
		resp, err := http.Get(u)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, body
	}
	code, body := fetch(u)
	require.Equal(t, 200, code)
	require.Equal(t, testenv.SHA256(data), testenv.SHA256(body))

	// The signature is checked: a tampered URL is refused.
	code, _ = fetch(strings.Replace(u, "X-Amz-Signature=", "X-Amz-Signature=0", 1))
	require.Equal(t, 403, code, fmt.Sprintf("tampered URL %s", u))
	// And the URL is for that key only.
	code, _ = fetch(strings.Replace(u, "presign.gguf", "presign2.gguf", 1))
	require.NotEqual(t, 200, code)
}
