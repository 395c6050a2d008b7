package activities

import (
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
)

// StageInput asks a node to hold a verified copy of a catalog entry.
type StageInput struct {
	NodeID string
	Entry  model.Entry
	// WorkflowID is the staging workflow that hears progress signals; empty
	// sends none.
	WorkflowID string
}

// StageProgress is the heartbeat detail of StageModel: what a retry resumes
// from. Offset bytes of the partial file were fsynced before it was
// recorded, and HashState is the sha256 state after exactly those bytes.
type StageProgress struct {
	Offset    int64
	HashState []byte
	// ETag is the object's at the time; a retry that finds another ETag
	// starts over, since the bytes it holds belong to another object.
	ETag string
	// Transferred is the bytes fetched by every attempt so far.
	Transferred int64
}

// Failure reasons on llorch_staging_failures_total.
const (
	reasonDiskFull         = model.ErrDiskFull
	reasonChecksumMismatch = model.ErrChecksumMismatch
	reasonObjectMissing    = model.ErrObjectMissing
	reasonIO               = "IO"
)

const stageBufferSize = 1 << 20

// StagingActivities copy models from the object store into a node's local
// catalog. They run on the node's own queue.
type StagingActivities struct {
	Store   *modelstore.Store
	Local   *modelstore.LocalCatalog
	Client  client.Client // signals progress to the staging workflow
	Log     *slog.Logger
	Metrics *StagingMetrics
	// DiskMargin is kept free beyond the model; the worker sets it.
	DiskMargin int64
	// CheckpointEvery is how often the partial is fsynced and its offset
	// heartbeated (0: 1s). It must be well under the activity's heartbeat
	// timeout.
	CheckpointEvery time.Duration
	// FreeBytes reports free space for the preflight (nil: Local.FreeBytes).
	FreeBytes func() (uint64, error)
}

// StageModel makes the node hold a verified copy of in.Entry: a no-op when
// the catalog already has it, else a download into a partial file that a
// retry resumes from the last heartbeat, then a check of size and sha256 and
// an atomic commit into the catalog. Failures a retry cannot fix (no room,
// no object, wrong bytes) are non-retryable and typed.
func (a *StagingActivities) StageModel(ctx context.Context, in StageInput) (model.StageResult, error) {
	began := time.Now()
	e := in.Entry
	if err := validateStageInput(in); err != nil {
		return model.StageResult{}, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s cannot stage model %q: %v", in.NodeID, e.ID, err), model.ErrInvalidStageInput, err)
	}
	st := &staging{a: a, in: in, ctx: ctx, began: began, every: a.CheckpointEvery,
		log: a.logger().With("node_id", in.NodeID, "model_id", e.ID, "sha256", e.SHA256[:model.DigestPrefixLen])}
	if st.every <= 0 {
		st.every = time.Second
	}
	res, reason, err := st.run()
	a.Metrics.addBytes(in.NodeID, st.fetched-st.counted)
	var app *temporal.ApplicationError
	if err != nil && ctx.Err() != nil && !errors.As(err, &app) {
		err, reason = ctx.Err(), ""
	}
	switch {
	case err == nil:
		a.Metrics.observeCatalog(in.NodeID, a.Local)
	case reason != "":
		a.Metrics.fail(in.NodeID, reason)
		st.log.Error("staging failed", "reason", reason, "error", err)
	case ctx.Err() != nil:
		st.log.Info("staging interrupted", "offset", st.offset, "cause", context.Cause(ctx))
	default:
		st.log.Warn("staging attempt failed", "offset", st.offset, "error", err)
	}
	return res, err
}

func validateStageInput(in StageInput) error {
	e := in.Entry
	if err := model.ValidateSHA256(e.SHA256); err != nil {
		return err
	}
	if err := model.ValidateKey(e.Key); err != nil {
		return err
	}
	if e.Size <= 0 {
		return fmt.Errorf("size %d is not positive", e.Size)
	}
	return nil
}

// staging is one attempt of StageModel.
type staging struct {
	a     *StagingActivities
	in    StageInput
	ctx   context.Context
	log   *slog.Logger
	began time.Time
	every time.Duration

	etag     string
	prior    int64 // bytes fetched by earlier attempts, as their heartbeats say
	have     int64 // size of the partial found on disk, -1 when none
	offset   int64 // bytes in the partial that the hash has seen
	start    int64 // offset this attempt resumed from
	fetched  int64 // bytes this attempt read from the object store
	counted  int64 // of fetched, already added to the bytes metric
	hash     hash.Hash
	file     *os.File
	lastStep int // last progress step signalled, in percent
}

// run returns the failure reason for the metrics with non-retryable errors
// and I/O errors; "" with success and cancellation.
func (s *staging) run() (model.StageResult, string, error) {
	a, e, sha := s.a, s.in.Entry, s.in.Entry.SHA256
	if prov, ok, err := a.Local.Get(sha); err != nil {
		return model.StageResult{}, reasonIO, s.wrap("read the local catalog", err)
	} else if ok {
		if err := a.Local.Touch(sha, time.Now()); err != nil {
			s.log.Warn("could not record use of staged model", "error", err)
		}
		s.log.Info("model already staged", "path", a.Local.Path(sha))
		return model.StageResult{Path: a.Local.Path(sha), SHA256: sha, Size: prov.Size, AlreadyPresent: true,
			DurationMs: time.Since(s.began).Milliseconds()}, "", nil
	}

	info, err := a.Store.Stat(s.ctx, e.Key)
	if errors.Is(err, modelstore.ErrObjectMissing) {
		return model.StageResult{}, reasonObjectMissing, s.objectMissing(err)
	}
	if err != nil {
		return model.StageResult{}, reasonIO, s.wrap("stat the object", err)
	}
	s.etag = info.ETag
	if info.Size != e.Size {
		// No need to fetch what cannot verify.
		_ = a.Local.RemovePartial(sha)
		return model.StageResult{}, reasonChecksumMismatch, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s: model %s at %s does not match its catalog entry: expected sha256 %s and %d bytes, the object has %d bytes",
				s.in.NodeID, e.ID, s.url(), sha, e.Size, info.Size), model.ErrChecksumMismatch, nil)
	}

	s.resumePoint()
	if reason, err := s.preflight(); err != nil {
		s.discardPartial() // the stage fails for good: nothing will resume from it
		return model.StageResult{}, reason, err
	}
	if err := s.openPartial(); err != nil {
		var app *temporal.ApplicationError
		if errors.As(err, &app) {
			return model.StageResult{}, "", err
		}
		return model.StageResult{}, reasonIO, err
	}
	defer func() {
		if s.file != nil {
			_ = s.file.Close() // also drops the lock
		}
	}()

	if err := s.download(); err != nil {
		if s.ctx.Err() != nil {
			return model.StageResult{}, "", s.ctx.Err()
		}
		var app *temporal.ApplicationError
		if errors.As(err, &app) && app.NonRetryable() {
			// Nothing will resume from this partial.
			_ = s.file.Close()
			s.file = nil
			_ = a.Local.RemovePartial(sha)
			return model.StageResult{}, app.Type(), err
		}
		return model.StageResult{}, reasonIO, err
	}

	sum := hex.EncodeToString(s.hash.Sum(nil))
	if sum != sha || s.offset != e.Size {
		_ = s.file.Close()
		s.file = nil
		rmErr := a.Local.RemovePartial(sha)
		msg := fmt.Sprintf("node %s: model %s from %s does not verify: expected sha256 %s and %d bytes, got sha256 %s and %d bytes",
			s.in.NodeID, e.ID, s.url(), sha, e.Size, sum, s.offset)
		if rmErr != nil {
			msg += fmt.Sprintf(" (and the partial could not be deleted: %v)", rmErr)
		}
		return model.StageResult{}, reasonChecksumMismatch, temporal.NewNonRetryableApplicationError(msg, model.ErrChecksumMismatch, nil)
	}

	took := s.duration()
	prov := modelstore.Provenance{
		ModelID: e.ID, Key: e.Key, SHA256: sha, Size: e.Size,
		Bucket: a.Store.Bucket, Endpoint: a.Store.Endpoint, ETag: s.etag,
		BytesTransferred: s.prior + s.fetched,
		Attempts:         int(activity.GetInfo(s.ctx).Attempt),
		DurationMs:       took.Milliseconds(),
	}
	if err := a.Local.Commit(sha, prov); err != nil {
		return model.StageResult{}, reasonIO, s.wrap("commit the verified file", err)
	}
	a.Metrics.observeDuration(s.in.NodeID, took)
	s.log.Info("model staged", "path", a.Local.Path(sha), "bytes", e.Size, "fetched", s.fetched,
		"resumed_from", s.start, "attempt", prov.Attempts, "duration", took)
	return model.StageResult{Path: a.Local.Path(sha), SHA256: sha, Size: e.Size, BytesTransferred: s.fetched,
		DurationMs: took.Milliseconds()}, "", nil
}

// resumePoint picks up from the last heartbeat when its partial and hash
// state are still good, else from 0.
func (s *staging) resumePoint() {
	s.hash = sha256.New()
	s.have = -1
	if fi, err := os.Stat(s.a.Local.PartialPath(s.in.Entry.SHA256)); err == nil {
		s.have = fi.Size()
	}
	var p StageProgress
	if !activity.HasHeartbeatDetails(s.ctx) {
		return
	}
	if err := activity.GetHeartbeatDetails(s.ctx, &p); err != nil {
		s.log.Warn("unreadable staging progress; starting over", "error", err)
		return
	}
	s.prior = p.Transferred
	if p.Offset <= 0 {
		return
	}
	have, why := s.have, ""
	switch {
	case p.Offset > s.in.Entry.Size:
		why = "checkpoint beyond the model's size"
	case have < p.Offset:
		why = fmt.Sprintf("partial has %d bytes, fewer than the checkpoint", have)
	case p.ETag != "" && p.ETag != s.etag:
		why = "the object changed (ETag " + p.ETag + " then, " + s.etag + " now)"
	default:
		if err := s.hash.(encoding.BinaryUnmarshaler).UnmarshalBinary(p.HashState); err != nil {
			why = "hash state unusable: " + err.Error()
			s.hash = sha256.New()
		}
	}
	if why != "" {
		s.log.Warn("cannot resume staging; starting over", "checkpoint", p.Offset, "why", why)
		return
	}
	s.offset, s.start = p.Offset, p.Offset
	s.log.Info("resuming staging", "offset", p.Offset, "previously_fetched", p.Transferred)
}

// preflight refuses a download the disk cannot take, before any byte lands.
func (s *staging) preflight() (string, error) {
	free, err := s.a.freeBytes()
	if err != nil {
		return reasonIO, s.wrap("measure free space", err)
	}
	toFetch := s.in.Entry.Size - s.offset
	needed := toFetch + s.a.DiskMargin
	// Bytes of the partial past the resume point are cut off before the
	// download, so they count as free.
	var reclaim uint64
	if s.have > s.offset {
		reclaim = uint64(s.have - s.offset)
	}
	if needed > 0 && free+reclaim < uint64(needed) {
		has := fmt.Sprint(free)
		if reclaim > 0 {
			has = fmt.Sprintf("%d (+%d in the discarded part of the partial)", free, reclaim)
		}
		return reasonDiskFull, temporal.NewNonRetryableApplicationError(
			fmt.Sprintf("node %s has no room for model %s (sha256 %s, %d bytes) in %s: needs %d bytes free (%d to fetch + %d margin), has %s",
				s.in.NodeID, s.in.Entry.ID, s.in.Entry.SHA256, s.in.Entry.Size, s.a.Local.Dir, needed, toFetch, s.a.DiskMargin, has),
			model.ErrDiskFull, nil)
	}
	return "", nil
}

// openPartial opens and locks the partial, and cuts it to the resume point:
// bytes written after the last checkpoint may never have reached the disk.
func (s *staging) openPartial() error {
	p := s.a.Local.PartialPath(s.in.Entry.SHA256)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return s.wrap("open the partial file", err)
	}
	// A timed-out attempt may still be writing; two writers would corrupt
	// the file, so the later attempt backs off and is retried.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return temporal.NewApplicationError(
				fmt.Sprintf("node %s: %s is still being written by an earlier attempt", s.in.NodeID, p), model.ErrStagingBusy)
		}
		return s.wrap("lock the partial file", err)
	}
	if err := f.Truncate(s.offset); err == nil {
		_, err = f.Seek(s.offset, io.SeekStart)
	}
	if err != nil {
		_ = f.Close()
		return s.wrap("truncate the partial file", err)
	}
	s.file = f
	return nil
}

// discardPartial deletes the partial, unless an earlier attempt that timed
// out still writes it (it holds the lock).
func (s *staging) discardPartial() {
	f, err := os.OpenFile(s.a.Local.PartialPath(s.in.Entry.SHA256), os.O_RDWR, 0)
	if err != nil {
		return
	}
	defer f.Close()
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
		_ = s.a.Local.RemovePartial(s.in.Entry.SHA256)
	}
}

// download fetches from the resume point to the end, checkpointing as it goes.
func (s *staging) download() error {
	e := s.in.Entry
	step := model.ProgressStepPercent
	s.lastStep = stagePercent(s.offset, e.Size) / step * step
	if s.offset < e.Size {
		var opts minio.GetObjectOptions
		if s.offset > 0 {
			if err := opts.SetRange(s.offset, 0); err != nil {
				return s.wrap("ranged get", err)
			}
		}
		if s.etag != "" {
			_ = opts.SetMatchETag(s.etag) // a replaced object fails the get instead of mixing bytes
		}
		obj, err := s.a.Store.Client.GetObject(s.ctx, s.a.Store.Bucket, e.Key, opts)
		if err != nil {
			return s.readErr(err)
		}
		defer obj.Close()
		ahead := newPrefetch(obj, stageBufferSize, 4)
		defer ahead.close()
		last := time.Now()
		for {
			if err := s.ctx.Err(); err != nil {
				s.saveProgress()
				return err
			}
			c := ahead.next()
			if n := len(c.b); n > 0 {
				// Hash and write the chunk at once, while the next one is
				// read: the three would otherwise take turns on one core.
				var wg sync.WaitGroup
				wg.Add(1)
				go func() { s.hash.Write(c.b); wg.Done() }()
				_, werr := s.file.Write(c.b)
				wg.Wait()
				ahead.release(c.b)
				if werr != nil {
					return s.writeErr("write the partial file", werr)
				}
				// Start writeback now rather than all at once in the next
				// fsync: the disk works while the network does.
				_ = unix.SyncFileRange(int(s.file.Fd()), s.offset, int64(n), unix.SYNC_FILE_RANGE_WRITE)
				s.offset += int64(n)
				s.fetched += int64(n)
			}
			if c.err == io.EOF {
				break
			}
			if c.err != nil {
				s.saveProgress()
				if s.ctx.Err() != nil {
					return s.ctx.Err()
				}
				return s.readErr(c.err)
			}
			if time.Since(last) >= s.every {
				if err := s.checkpoint(); err != nil {
					return err
				}
				last = time.Now()
			}
		}
	}
	// The last checkpoint lets a retry after a failed commit skip the download.
	return s.checkpoint()
}

// checkpoint makes the partial durable up to offset, then records that as
// the resume point and, past each progress step, tells the workflow.
func (s *staging) checkpoint() error {
	if err := s.file.Sync(); err != nil {
		return s.writeErr("fsync the partial file", err)
	}
	state, err := s.hash.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return s.wrap("save the hash state", err)
	}
	activity.RecordHeartbeat(s.ctx, StageProgress{Offset: s.offset, HashState: state, ETag: s.etag, Transferred: s.prior + s.fetched})
	s.a.Metrics.addBytes(s.in.NodeID, s.fetched-s.counted)
	s.counted = s.fetched
	s.signalProgress()
	return nil
}

// saveProgress is a last checkpoint on the way out of a failed attempt, so
// the retry resumes from as far as this one got.
func (s *staging) saveProgress() {
	if s.offset > s.start {
		_ = s.checkpoint()
	}
}

func (s *staging) signalProgress() {
	e := s.in.Entry
	pct := stagePercent(s.offset, e.Size)
	step := pct / model.ProgressStepPercent * model.ProgressStepPercent
	if step <= s.lastStep {
		return
	}
	s.lastStep = step
	if s.in.WorkflowID == "" || s.a.Client == nil || s.ctx.Err() != nil {
		return
	}
	var rate float64
	if secs := time.Since(s.began).Seconds(); secs > 0 {
		rate = float64(s.fetched) / secs
	}
	// A slow frontend must not stall the download; progress is advisory.
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	err := s.a.Client.SignalWorkflow(ctx, s.in.WorkflowID, "", model.SignalStageProgress,
		model.StageProgressSignal{BytesDone: s.offset, BytesTotal: e.Size, Percent: pct, RateBytesPerSec: rate})
	if err != nil {
		s.log.Warn("could not signal staging progress", "workflow_id", s.in.WorkflowID, "percent", pct, "error", err)
	}
}

func stagePercent(done, total int64) int {
	if total <= 0 {
		return 100
	}
	return int(done * 100 / total)
}

func (s *staging) readErr(err error) error {
	if isNoSuchKey(err) {
		return s.objectMissing(err)
	}
	return s.wrap("read the object", err)
}

// isNoSuchKey says whether a get failed because the object is gone (deleted
// between the stat and the get).
func isNoSuchKey(err error) bool {
	r := minio.ToErrorResponse(err)
	return r.Code == minio.NoSuchKey || r.StatusCode == http.StatusNotFound && r.Code != minio.NoSuchBucket
}

// writeErr turns a full disk into DISK_FULL, final like the preflight's: a
// retry would only fill the disk again (the partial is deleted, which frees
// what it held). Other write errors are retried.
func (s *staging) writeErr(what string, err error) error {
	if !errors.Is(err, unix.ENOSPC) && !errors.Is(err, unix.EDQUOT) {
		return s.wrap(what, err)
	}
	free, _ := s.a.freeBytes()
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("node %s: disk full in %s while staging model %s (sha256 %s, %d bytes): %d bytes written, %d to go, %d bytes free",
			s.in.NodeID, s.a.Local.Dir, s.in.Entry.ID, s.in.Entry.SHA256, s.in.Entry.Size, s.offset, s.in.Entry.Size-s.offset, free),
		model.ErrDiskFull, err)
}

func (s *staging) objectMissing(err error) error {
	return temporal.NewNonRetryableApplicationError(
		fmt.Sprintf("node %s: model %s: no object at %s", s.in.NodeID, s.in.Entry.ID, s.url()), model.ErrObjectMissing, err)
}

func (s *staging) wrap(what string, err error) error {
	return fmt.Errorf("node %s: stage model %s (sha256 %s): %s: %w",
		s.in.NodeID, s.in.Entry.ID, s.in.Entry.SHA256[:model.DigestPrefixLen], what, err)
}

func (s *staging) url() string { return "s3://" + s.a.Store.Bucket + "/" + s.in.Entry.Key }

// duration runs from the first attempt's scheduling when the SDK knows it.
func (s *staging) duration() time.Duration {
	from := s.began
	if sched := activity.GetInfo(s.ctx).ScheduledTime; !sched.IsZero() && sched.Before(from) {
		from = sched
	}
	return time.Since(from)
}

func (a *StagingActivities) freeBytes() (uint64, error) {
	if a.FreeBytes != nil {
		return a.FreeBytes()
	}
	return a.Local.FreeBytes()
}

func (a *StagingActivities) logger() *slog.Logger {
	if a.Log != nil {
		return a.Log
	}
	return slog.Default()
}

// StagingMetrics are the counters of model staging on a node.
type StagingMetrics struct {
	Bytes        *prometheus.CounterVec
	Duration     *prometheus.HistogramVec
	Failures     *prometheus.CounterVec
	CatalogBytes *prometheus.GaugeVec
}

// NewStagingMetrics registers the staging metrics on reg.
func NewStagingMetrics(reg prometheus.Registerer) *StagingMetrics {
	f := promauto.With(reg)
	return &StagingMetrics{
		Bytes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_staging_bytes_total", Help: "Bytes fetched from the object store into the local model catalog.",
		}, []string{"node_id"}),
		Duration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "llorch_staging_duration_seconds", Help: "Time to stage a model, from the first attempt's scheduling to its commit.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14), // 1 s .. ~2.3 h
		}, []string{"node_id"}),
		Failures: f.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_staging_failures_total", Help: "Failed staging attempts, by reason (DISK_FULL, CHECKSUM_MISMATCH, OBJECT_MISSING, IO).",
		}, []string{"node_id", "reason"}),
		CatalogBytes: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "llorch_catalog_bytes", Help: "Bytes of verified models in the node's local catalog.",
		}, []string{"node_id"}),
	}
}

// ObserveCatalog sets llorch_catalog_bytes from the catalog; whatever
// removes models (GC) calls it too.
func (m *StagingMetrics) ObserveCatalog(nodeID string, c *modelstore.LocalCatalog) error {
	if m == nil || c == nil {
		return nil
	}
	n, err := c.VerifiedBytes()
	if err != nil {
		return err
	}
	m.CatalogBytes.WithLabelValues(nodeID).Set(float64(n))
	return nil
}

func (m *StagingMetrics) observeCatalog(nodeID string, c *modelstore.LocalCatalog) {
	_ = m.ObserveCatalog(nodeID, c) // the next commit or GC sets it again
}

func (m *StagingMetrics) addBytes(nodeID string, n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.Bytes.WithLabelValues(nodeID).Add(float64(n))
}

func (m *StagingMetrics) fail(nodeID, reason string) {
	if m == nil {
		return
	}
	m.Failures.WithLabelValues(nodeID, reason).Inc()
}

func (m *StagingMetrics) observeDuration(nodeID string, d time.Duration) {
	if m == nil {
		return
	}
	m.Duration.WithLabelValues(nodeID).Observe(d.Seconds())
}

// prefetch reads ahead into a few buffers on its own goroutine, so reading
// the next chunk from the network overlaps writing and hashing this one.
type prefetch struct {
	chunks chan prefetched
	free   chan []byte
	done   chan struct{}
}

type prefetched struct {
	b   []byte
	err error // io.EOF after the last chunk
}

func newPrefetch(r io.Reader, size, depth int) *prefetch {
	p := &prefetch{chunks: make(chan prefetched, depth), free: make(chan []byte, depth), done: make(chan struct{})}
	for i := 0; i < depth; i++ {
		p.free <- make([]byte, size)
	}
	go func() {
		for {
			var b []byte
			select {
			case b = <-p.free:
			case <-p.done:
				return
			}
			n, err := io.ReadFull(r, b)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			select {
			case p.chunks <- prefetched{b: b[:n], err: err}:
			case <-p.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return p
}

func (p *prefetch) next() prefetched { return <-p.chunks }

func (p *prefetch) release(b []byte) { p.free <- b[:cap(b)] }

// close stops the reader; closing the object it reads unblocks a read in
// flight.
func (p *prefetch) close() { close(p.done) }
