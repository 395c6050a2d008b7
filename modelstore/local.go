package modelstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// Provenance is the sidecar of a verified model file: where it came from and
// how it got here. Its presence is what puts a file in the local catalog.
type Provenance struct {
	ModelID          string    `json:"model_id"`
	Key              string    `json:"key"`
	SHA256           string    `json:"sha256"`
	Size             int64     `json:"size"`
	Bucket           string    `json:"bucket"`
	Endpoint         string    `json:"endpoint"`
	ETag             string    `json:"etag"`
	StagedAt         time.Time `json:"staged_at"`
	LastUsed         time.Time `json:"last_used"`
	BytesTransferred int64     `json:"bytes_transferred"`
	Attempts         int       `json:"attempts"`
	DurationMs       int64     `json:"duration_ms"`
}

// PartialInfo is a download in progress (or abandoned) under .partial/.
type PartialInfo struct {
	SHA256  string
	Path    string
	Size    int64
	ModTime time.Time
}

// LocalCatalog is a node's model files, addressed by sha256:
//
//	<dir>/<sha256>.gguf              verified file
//	<dir>/<sha256>.json              Provenance sidecar, written last
//	<dir>/.partial/<sha256>.partial  download in progress
//
// A file without its sidecar (a crash between rename and sidecar, or during
// Remove) is not in the catalog; neither is a sidecar without its file.
type LocalCatalog struct {
	Dir string
}

const (
	partialDir    = ".partial"
	modelExt      = ".gguf"
	sidecarExt    = ".json"
	partialExt    = ".partial"
	dirPerm       = 0o755
	filePerm      = 0o644
	sidecarTmpPat = ".sidecar-*.tmp"
)

// NewLocalCatalog opens (creating if need be) the catalog under dir.
func NewLocalCatalog(dir string) (*LocalCatalog, error) {
	if dir == "" {
		return nil, errors.New("local model catalog: no directory given")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("local model catalog %s: %w", dir, err)
	}
	if err := os.MkdirAll(filepath.Join(abs, partialDir), dirPerm); err != nil {
		return nil, fmt.Errorf("local model catalog: create %s: %w", abs, err)
	}
	return &LocalCatalog{Dir: abs}, nil
}

// Path is where the verified file of sha lives; "" when sha is not a valid
// digest, so a bad digest never names a file (opening "" fails).
func (c *LocalCatalog) Path(sha string) string { return c.file(sha, "", modelExt) }

// PartialPath is where the download of sha accumulates; "" when sha is not a
// valid digest.
func (c *LocalCatalog) PartialPath(sha string) string { return c.file(sha, partialDir, partialExt) }

func (c *LocalCatalog) sidecarPath(sha string) string { return c.file(sha, "", sidecarExt) }

func (c *LocalCatalog) file(sha, sub, ext string) string {
	if model.ValidateSHA256(sha) != nil {
		return ""
	}
	return filepath.Join(c.Dir, sub, sha+ext)
}

// Get returns the provenance of sha when its verified file and sidecar are
// both there and agree on the size. A file whose size differs from its
// sidecar is treated as absent, so staging it again repairs it.
func (c *LocalCatalog) Get(sha string) (Provenance, bool, error) {
	if err := model.ValidateSHA256(sha); err != nil {
		return Provenance{}, false, err
	}
	prov, err := c.readSidecar(sha)
	if errors.Is(err, fs.ErrNotExist) {
		return Provenance{}, false, nil
	}
	if err != nil {
		return Provenance{}, false, err
	}
	st, err := os.Stat(c.Path(sha))
	if errors.Is(err, fs.ErrNotExist) {
		return Provenance{}, false, nil
	}
	if err != nil {
		return Provenance{}, false, fmt.Errorf("local model catalog: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() != prov.Size {
		return Provenance{}, false, nil
	}
	return prov, true, nil
}

func (c *LocalCatalog) readSidecar(sha string) (Provenance, error) {
	b, err := os.ReadFile(c.sidecarPath(sha))
	if err != nil {
		return Provenance{}, err
	}
	var prov Provenance
	if err := json.Unmarshal(b, &prov); err != nil {
		return Provenance{}, fmt.Errorf("local model catalog: sidecar %s is not valid JSON: %w", c.sidecarPath(sha), err)
	}
	if prov.SHA256 != sha {
		return Provenance{}, fmt.Errorf("local model catalog: sidecar %s names sha256 %q", c.sidecarPath(sha), prov.SHA256)
	}
	return prov, nil
}

// List returns every catalog entry, sorted by sha256.
func (c *LocalCatalog) List() ([]Provenance, error) {
	ents, err := os.ReadDir(c.Dir)
	if err != nil {
		return nil, fmt.Errorf("local model catalog: %w", err)
	}
	out := []Provenance{}
	for _, e := range ents {
		sha, ok := strings.CutSuffix(e.Name(), sidecarExt)
		if !ok || e.IsDir() || model.ValidateSHA256(sha) != nil {
			continue
		}
		prov, present, err := c.Get(sha)
		if err != nil {
			return nil, err
		}
		if present {
			out = append(out, prov)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].SHA256 < out[j].SHA256 })
	return out, nil
}

// Commit moves the finished, verified partial of sha into the catalog:
// fsync it, rename it to Path(sha), fsync the directory, then write the
// sidecar atomically. prov.SHA256 and prov.Size are checked against sha and
// the file; zero StagedAt and LastUsed become now.
func (c *LocalCatalog) Commit(sha string, prov Provenance) error {
	if err := model.ValidateSHA256(sha); err != nil {
		return err
	}
	if prov.SHA256 == "" {
		prov.SHA256 = sha
	}
	if prov.SHA256 != sha {
		return fmt.Errorf("local model catalog: commit %s with provenance of sha256 %s", sha, prov.SHA256)
	}
	partial := c.PartialPath(sha)
	f, err := os.OpenFile(partial, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("local model catalog: commit %s: %w", sha, err)
	}
	st, err := f.Stat()
	if err == nil && prov.Size != st.Size() {
		err = fmt.Errorf("partial %s has %d bytes, provenance says %d", partial, st.Size(), prov.Size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("local model catalog: commit %s: %w", sha, err)
	}
	if err := os.Rename(partial, c.Path(sha)); err != nil {
		return fmt.Errorf("local model catalog: commit %s: %w", sha, err)
	}
	if err := syncDir(c.Dir); err != nil {
		return fmt.Errorf("local model catalog: commit %s: %w", sha, err)
	}
	now := time.Now().UTC()
	if prov.StagedAt.IsZero() {
		prov.StagedAt = now
	}
	if prov.LastUsed.IsZero() {
		prov.LastUsed = prov.StagedAt
	}
	return c.writeSidecar(prov)
}

// writeSidecar replaces the sidecar atomically: tmp, fsync, rename, fsync dir.
func (c *LocalCatalog) writeSidecar(prov Provenance) error {
	b, err := json.MarshalIndent(prov, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(c.Dir, sidecarTmpPat)
	if err != nil {
		return fmt.Errorf("local model catalog: sidecar of %s: %w", prov.SHA256, err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Chmod(filePerm)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), c.sidecarPath(prov.SHA256))
	}
	if err == nil {
		err = syncDir(c.Dir)
	}
	if err != nil {
		return fmt.Errorf("local model catalog: sidecar of %s: %w", prov.SHA256, err)
	}
	return nil
}

// Remove drops sha from the catalog: the file first, then the sidecar, so
// an interruption leaves at worst a sidecar that Get ignores and the next
// Remove clears. Removing what is not there is not an error.
func (c *LocalCatalog) Remove(sha string) error {
	if err := model.ValidateSHA256(sha); err != nil {
		return err
	}
	for _, p := range []string{c.Path(sha), c.sidecarPath(sha)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("local model catalog: remove %s: %w", sha, err)
		}
	}
	return syncDir(c.Dir)
}

// RemovePartial deletes the download in progress of sha, if any.
func (c *LocalCatalog) RemovePartial(sha string) error {
	if err := model.ValidateSHA256(sha); err != nil {
		return err
	}
	if err := os.Remove(c.PartialPath(sha)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("local model catalog: remove partial of %s: %w", sha, err)
	}
	return nil
}

// Touch records that sha was used at t (GC evicts the least recently used).
func (c *LocalCatalog) Touch(sha string, t time.Time) error {
	prov, ok, err := c.Get(sha)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("local model catalog: touch %s: %w", sha, fs.ErrNotExist)
	}
	prov.LastUsed = t.UTC()
	return c.writeSidecar(prov)
}

// Partials lists the downloads in progress, sorted by sha256.
func (c *LocalCatalog) Partials() ([]PartialInfo, error) {
	dir := filepath.Join(c.Dir, partialDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return []PartialInfo{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local model catalog: %w", err)
	}
	out := []PartialInfo{}
	for _, e := range ents {
		sha, ok := strings.CutSuffix(e.Name(), partialExt)
		if !ok || !e.Type().IsRegular() || model.ValidateSHA256(sha) != nil {
			continue
		}
		info, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // committed or removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("local model catalog: %w", err)
		}
		out = append(out, PartialInfo{SHA256: sha, Path: filepath.Join(dir, e.Name()), Size: info.Size(), ModTime: info.ModTime()})
	}
	return out, nil // ReadDir sorts by name, hence by sha256
}

// VerifiedBytes is the size of the files in the catalog.
func (c *LocalCatalog) VerifiedBytes() (int64, error) {
	list, err := c.List()
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, p := range list {
		sum += p.Size
	}
	return sum, nil
}

// UsedBytes is what the catalog holds on disk: verified files plus partials.
func (c *LocalCatalog) UsedBytes() (int64, error) {
	sum, err := c.VerifiedBytes()
	if err != nil {
		return 0, err
	}
	parts, err := c.Partials()
	if err != nil {
		return 0, err
	}
	for _, p := range parts {
		sum += p.Size
	}
	return sum, nil
}

// FreeBytes is the space an unprivileged writer may still use on Dir's
// file system.
func (c *LocalCatalog) FreeBytes() (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(c.Dir, &st); err != nil {
		return 0, fmt.Errorf("local model catalog: statfs %s: %w", c.Dir, err)
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// Copies is the catalog as a node reports it in its heartbeats.
func (c *LocalCatalog) Copies() ([]node.ModelCopy, error) {
	list, err := c.List()
	if err != nil {
		return nil, err
	}
	out := make([]node.ModelCopy, 0, len(list))
	for _, p := range list {
		out = append(out, node.ModelCopy{ModelID: p.ModelID, SHA256: p.SHA256, Size: p.Size, StagedAt: p.StagedAt, LastUsed: p.LastUsed})
	}
	return out, nil
}

// syncDir makes a rename or removal in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
