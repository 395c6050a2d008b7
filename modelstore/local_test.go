package modelstore

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/testenv"
)

// writeLocalPartial writes data as the partial of its digest, as a download would.
func writeLocalPartial(t *testing.T, c *LocalCatalog, data []byte) string {
	t.Helper()
	sha := testenv.SHA256(data)
	require.NoError(t, os.WriteFile(c.PartialPath(sha), data, 0o644))
	return sha
}

func newLocalCatalog(t *testing.T) *LocalCatalog {
	t.Helper()
	c, err := NewLocalCatalog(t.TempDir())
	require.NoError(t, err)
	return c
}

// commitLocal puts data in c as model modelID and returns its digest.
func commitLocal(t *testing.T, c *LocalCatalog, modelID string, data []byte) string {
	t.Helper()
	sha := writeLocalPartial(t, c, data)
	require.NoError(t, c.Commit(sha, Provenance{ModelID: modelID, Size: int64(len(data))}))
	return sha
}

func TestLocalCatalogCommitGetList(t *testing.T) {
	c, err := NewLocalCatalog(filepath.Join(t.TempDir(), "models"))
	require.NoError(t, err)
	assert.DirExists(t, filepath.Join(c.Dir, ".partial"))

	a, b := []byte("model a, quite small"), []byte("model b")
	shaA, shaB := writeLocalPartial(t, c, a), writeLocalPartial(t, c, b)

	parts, err := c.Partials()
	require.NoError(t, err)
	require.Len(t, parts, 2)
	used, err := c.UsedBytes()
	require.NoError(t, err)
	assert.Equal(t, int64(len(a)+len(b)), used, "partials count as used")

	staged := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	require.NoError(t, c.Commit(shaA, Provenance{ModelID: "model-a", Key: "models/a.gguf", Size: int64(len(a)),
		Bucket: "b", Endpoint: "e:1", ETag: "etag-a", StagedAt: staged, BytesTransferred: int64(len(a)), Attempts: 1}))
	require.NoError(t, c.Commit(shaB, Provenance{ModelID: "model-b", SHA256: shaB, Size: int64(len(b))}))

	got, err := os.ReadFile(c.Path(shaA))
	require.NoError(t, err)
	assert.Equal(t, a, got)
	assert.NoFileExists(t, c.PartialPath(shaA))
	assert.FileExists(t, filepath.Join(c.Dir, shaA+".json"))

	prov, ok, err := c.Get(shaA)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, "model-a", prov.ModelID)
	assert.Equal(t, shaA, prov.SHA256)
	assert.Equal(t, "etag-a", prov.ETag)
	assert.True(t, staged.Equal(prov.StagedAt))
	assert.True(t, staged.Equal(prov.LastUsed), "LastUsed starts at StagedAt")

	list, err := c.List()
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.Less(t, list[0].SHA256, list[1].SHA256, "sorted by sha256")

	parts, err = c.Partials()
	require.NoError(t, err)
	assert.Empty(t, parts)
	used, err = c.UsedBytes()
	require.NoError(t, err)
	assert.Equal(t, int64(len(a)+len(b)), used)

	copies, err := c.Copies()
	require.NoError(t, err)
	require.Len(t, copies, 2)
	for _, cp := range copies {
		if cp.SHA256 == shaA {
			assert.Equal(t, "model-a", cp.ModelID)
			assert.Equal(t, int64(len(a)), cp.Size)
			assert.True(t, staged.Equal(cp.StagedAt))
		}
	}

	free, err := c.FreeBytes()
	require.NoError(t, err)
	assert.Positive(t, free)
}

func TestLocalCatalogTouchRemove(t *testing.T) {
	c := newLocalCatalog(t)
	sha := commitLocal(t, c, "m", []byte("gguf bytes"))

	used := time.Date(2030, 5, 6, 7, 8, 9, 0, time.UTC)
	require.NoError(t, c.Touch(sha, used))
	prov, ok, err := c.Get(sha)
	require.NoError(t, err)
	require.True(t, ok)
	assert.True(t, used.Equal(prov.LastUsed))

	require.NoError(t, c.Remove(sha))
	assert.NoFileExists(t, c.Path(sha))
	assert.NoFileExists(t, filepath.Join(c.Dir, sha+".json"))
	_, ok, err = c.Get(sha)
	require.NoError(t, err)
	assert.False(t, ok)
	require.NoError(t, c.Remove(sha), "removing twice is fine")
	assert.Error(t, c.Touch(sha, used), "nothing to touch")

	list, err := c.List()
	require.NoError(t, err)
	assert.Empty(t, list)
	// No stray temporary sidecars.
	ents, err := os.ReadDir(c.Dir)
	require.NoError(t, err)
	for _, e := range ents {
		assert.Equal(t, ".partial", e.Name())
	}
}

func TestLocalCatalogHalfPresentIsAbsent(t *testing.T) {
	c := newLocalCatalog(t)
	sha := commitLocal(t, c, "m", []byte("0123456789"))

	// A file without its sidecar (crash between rename and sidecar).
	require.NoError(t, os.Remove(filepath.Join(c.Dir, sha+".json")))
	_, ok, err := c.Get(sha)
	require.NoError(t, err)
	assert.False(t, ok)

	// A sidecar without its file (crash inside Remove).
	sha2 := commitLocal(t, c, "m2", []byte("other"))
	require.NoError(t, os.Remove(c.Path(sha2)))
	list, err := c.List()
	require.NoError(t, err)
	assert.Empty(t, list)

	// A truncated file does not count either.
	sha3 := commitLocal(t, c, "m3", []byte("third model"))
	require.NoError(t, os.Truncate(c.Path(sha3), 4))
	_, ok, err = c.Get(sha3)
	require.NoError(t, err)
	assert.False(t, ok)
}

func TestLocalCatalogCommitChecks(t *testing.T) {
	c := newLocalCatalog(t)
	data := []byte("abc")
	sha := writeLocalPartial(t, c, data)
	assert.ErrorContains(t, c.Commit(sha, Provenance{Size: 4}), "has 3 bytes")
	assert.Error(t, c.Commit(sha, Provenance{SHA256: testenv.SHA256([]byte("x")), Size: 3}))
	assert.Error(t, c.Commit(testenv.SHA256([]byte("no partial")), Provenance{Size: 3}))
	_, ok, err := c.Get(sha)
	require.NoError(t, err)
	assert.False(t, ok)
	assert.FileExists(t, c.PartialPath(sha), "a refused commit leaves the partial")

	require.NoError(t, c.RemovePartial(sha))
	assert.NoFileExists(t, c.PartialPath(sha))
	require.NoError(t, c.RemovePartial(sha))
}

func TestLocalCatalogRefusesBadDigests(t *testing.T) {
	c := newLocalCatalog(t)
	for _, bad := range []string{"../x", "", "ABC", testenv.SHA256(nil) + "/..", "../" + testenv.SHA256(nil)[3:], testenv.SHA256(nil)[:63] + "G"} {
		assert.Empty(t, c.Path(bad), bad)
		assert.Empty(t, c.PartialPath(bad), bad)
		_, _, err := c.Get(bad)
		assert.Error(t, err, bad)
		assert.Error(t, c.Commit(bad, Provenance{}), bad)
		assert.Error(t, c.Remove(bad), bad)
		assert.Error(t, c.RemovePartial(bad), bad)
		assert.Error(t, c.Touch(bad, time.Now()), bad)
	}
	// Files with names that are not digests are not part of the catalog.
	require.NoError(t, os.WriteFile(filepath.Join(c.Dir, "notes.json"), []byte("{}"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(c.Dir, ".partial", "x.partial"), []byte("x"), 0o644))
	list, err := c.List()
	require.NoError(t, err)
	assert.Empty(t, list)
	parts, err := c.Partials()
	require.NoError(t, err)
	assert.Empty(t, parts)
}
