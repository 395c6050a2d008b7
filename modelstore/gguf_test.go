package modelstore

import (
	"bytes"
	"context"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/model"
)

func writeTemp(t *testing.T, name string, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return path
}

func TestReadMetadataOfTinyModel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, WriteTinyFile(path, TinyOptions{}))
	st, err := os.Stat(path)
	require.NoError(t, err)

	md, err := ReadMetadata(path, 0)
	require.NoError(t, err)
	assert.Equal(t, "llama", md.Architecture)
	assert.Equal(t, "llorch-tiny", md.Name)
	assert.Equal(t, uint64(2), md.Layers)
	assert.Equal(t, uint64(256), md.ContextLength)
	assert.Equal(t, tinyParams(2, 64, 450), md.Parameters, "every weight written, nothing else")
	assert.Equal(t, "F32", md.Quantization)
	assert.Equal(t, uint64(256), md.EstimateContext, "0 means min(4096, context length)")
	// Fully offloaded: the card holds at least every weight.
	assert.Greater(t, md.EstimatedVRAMBytes, uint64(4*md.Parameters))
	assert.Less(t, md.EstimatedVRAMBytes, uint64(1<<30), "a tiny model needs little: %d", md.EstimatedVRAMBytes)
	t.Logf("file %d bytes, metadata %+v", st.Size(), md)

	// A longer context costs a bigger KV cache.
	long, err := ReadMetadata(path, 8192)
	require.NoError(t, err)
	assert.Equal(t, uint64(8192), long.EstimateContext)
	assert.Greater(t, long.EstimatedVRAMBytes, md.EstimatedVRAMBytes)

	// More layers, other name and context.
	path2 := filepath.Join(t.TempDir(), "tiny2.gguf")
	require.NoError(t, WriteTinyFile(path2, TinyOptions{Layers: 5, Embd: 32, Vocab: 300, Context: 8192, Name: "other"}))
	md2, err := ReadMetadata(path2, 0)
	require.NoError(t, err)
	assert.Equal(t, model.Metadata{
		Architecture: "llama", Name: "other", Parameters: tinyParams(5, 32, 300),
		ContextLength: 8192, Quantization: "F32", Layers: 5, EstimateContext: 4096,
		EstimatedVRAMBytes: md2.EstimatedVRAMBytes, EstimatedRAMBytes: md2.EstimatedRAMBytes,
	}, md2)
}

func TestReadMetadataNotGGUF(t *testing.T) {
	tiny := tinyBytes(t, TinyOptions{})
	random := make([]byte, 4096)
	for i := range random {
		random[i] = byte(rand.N(256))
	}
	random[0] = 'X' // never "GGUF" by chance
	for name, tc := range map[string]struct {
		content []byte
		reason  string
	}{
		"zip":             {[]byte("PK\x03\x04\x14\x00\x00\x00\x08\x00rest of a zip"), `magic "PK\x03\x04"`},
		"random":          {random, "magic"},
		"empty":           {nil, "0 bytes long"},
		"short":           {[]byte("GG"), "2 bytes long"},
		"ggml":            {[]byte("tjggsome old llama.cpp file"), "magic"},
		"magic only":      {[]byte("GGUF"), "EOF"},
		"truncated head":  {tiny[:100], "tensor count too large"},
		"truncated vocab": {tiny[:2000], "EOF"},
		"truncated data":  {tiny[:len(tiny)-1000], "tensor data needs"},
		"future version":  {append([]byte("GGUF\x09\x00\x00\x00"), tiny[8:]...), "unsupported GGUF version"},
		"absurd tensor #": {append(append([]byte("GGUF\x03\x00\x00\x00"), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f), tiny[16:]...), "too large"},
	} {
		t.Run(name, func(t *testing.T) {
			path := writeTemp(t, "x.gguf", tc.content)
			_, err := ReadMetadata(path, 0)
			require.ErrorIs(t, err, ErrNotGGUF)
			assert.Contains(t, err.Error(), tc.reason)
			assert.True(t, strings.HasPrefix(err.Error(), "not a GGUF file: "), err.Error())
		})
	}

	// A missing file is an I/O error, not a verdict on the content.
	_, err := ReadMetadata(filepath.Join(t.TempDir(), "missing.gguf"), 0)
	require.ErrorIs(t, err, fs.ErrNotExist)
	assert.NotErrorIs(t, err, ErrNotGGUF)
}

// s3Like serves content like a presigned S3 GET URL: GET with Range support,
// HEAD refused (the signature covers the method), and 403 without the
// signature query.
type s3Like struct {
	content      []byte
	refuseRanges bool // answer ranged GETs 403, as when the URL expires meanwhile
	mu           sync.Mutex
	ranges       []string
	heads        int
}

func (s *s3Like) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if r.Method == http.MethodHead {
		s.heads++
	} else {
		s.ranges = append(s.ranges, r.Header.Get("Range"))
	}
	s.mu.Unlock()
	if r.Method != http.MethodGet || r.URL.Query().Get("X-Amz-Signature") != "secret" {
		http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
		return
	}
	if s.refuseRanges && r.Header.Get("Range") != "" {
		http.Error(w, "AccessDenied", http.StatusForbidden)
		return
	}
	http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(s.content))
}

func TestReadMetadataRemoteMatchesLocal(t *testing.T) {
	o := TinyOptions{Layers: 3, Vocab: 500, Context: 1024}
	content := tinyBytes(t, o)
	local, err := ReadMetadata(writeTemp(t, "tiny.gguf", content), 0)
	require.NoError(t, err)

	srv := &s3Like{content: content}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	remote, err := ReadMetadataRemote(context.Background(), ts.URL+"/bucket/models/tiny.gguf?X-Amz-Signature=secret", 0)
	require.NoError(t, err)
	assert.Equal(t, local, remote)
	assert.Zero(t, srv.heads, "no HEAD: presigned GET URLs refuse it")
	require.NotEmpty(t, srv.ranges)
	for _, r := range srv.ranges[1:] {
		assert.True(t, strings.HasPrefix(r, "bytes="), "ranged reads after the first GET: %q", srv.ranges)
	}
}

func TestReadMetadataRemoteErrors(t *testing.T) {
	ctx := context.Background()
	srv := &s3Like{content: []byte("PK\x03\x04 a zip, not a model")}
	ts := httptest.NewServer(srv)
	defer ts.Close()

	_, err := ReadMetadataRemote(ctx, ts.URL+"/b/k.gguf?X-Amz-Signature=secret", 0)
	require.ErrorIs(t, err, ErrNotGGUF)
	assert.NotContains(t, err.Error(), "secret")

	truncated := &s3Like{content: tinyBytes(t, TinyOptions{})[:200]}
	ts2 := httptest.NewServer(truncated)
	defer ts2.Close()
	_, err = ReadMetadataRemote(ctx, ts2.URL+"/b/k.gguf?X-Amz-Signature=secret", 0)
	require.ErrorIs(t, err, ErrNotGGUF)

	// Refused (an expired or wrong signature): an HTTP error, not a verdict,
	// and the message does not leak the query.
	_, err = ReadMetadataRemote(ctx, ts.URL+"/b/k.gguf?X-Amz-Signature=wrong", 0)
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrNotGGUF)
	assert.Contains(t, err.Error(), "403")
	assert.NotContains(t, err.Error(), "wrong")

	// Failing after the first GET: an HTTP error, not a verdict.
	flaky := &s3Like{content: tinyBytes(t, TinyOptions{}), refuseRanges: true}
	ts4 := httptest.NewServer(flaky)
	defer ts4.Close()
	_, err = ReadMetadataRemote(ctx, ts4.URL+"/b/k.gguf?X-Amz-Signature=secret", 0)
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrNotGGUF)
	assert.Contains(t, err.Error(), "403 Forbidden")

	// Nobody listening: the parser's client retries (about 6 s in all)
	// until the context ends.
	ts3 := httptest.NewServer(http.NotFoundHandler())
	gone := ts3.URL
	ts3.Close()
	tctx, stop := context.WithTimeout(ctx, 300*time.Millisecond)
	defer stop()
	_, err = ReadMetadataRemote(tctx, gone+"/b/k.gguf?X-Amz-Signature=topsecret", 0)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.NotErrorIs(t, err, ErrNotGGUF)
	assert.NotContains(t, err.Error(), "topsecret")

	// Canceled.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = ReadMetadataRemote(cctx, ts.URL+"/b/k.gguf?X-Amz-Signature=secret", 0)
	require.ErrorIs(t, err, context.Canceled)
	assert.NotErrorIs(t, err, ErrNotGGUF)
}
