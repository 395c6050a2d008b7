package outputs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/minio/minio-go/v7"
	commonpb "go.temporal.io/api/common/v1"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/proto"

	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/task"
)

// Prefix is where outputs live in the bucket (the only prefix nodes write).
const Prefix = "outputs/"

// DefaultMaxInline is the largest output (its tokens and pieces as JSON)
// a generation returns in its result; above it the output goes to the
// bucket. Temporal refuses a payload over 2 MiB and warns above 512 KiB;
// the task's status holds the text and the pieces, about twice this, and
// the generation's result holds it once more.
const DefaultMaxInline = 256 << 10

// MaxObject bounds what a read takes from the bucket: an output no
// generation could produce (1<<20 tokens, the stream's bound, of long
// pieces) is refused rather than read into memory.
const MaxObject = 256 << 20

// Key is the object of one generation of a task (an activity attempt).
func Key(taskID, activityID string, attempt int32) string {
	return Prefix + taskID + "/" + activityID + "." + strconv.Itoa(int(attempt)) + ".payload"
}

// Size is the encoded size of an output, what the inline bound compares.
func Size(out task.Output) int {
	b, _ := json.Marshal(out)
	return len(b)
}

// Store reads and writes outputs in the bucket.
type Store struct {
	Bucket *modelstore.Store
	// DC makes the object's payload: the cluster's data converter, so an
	// output is encrypted with the codec's keys when they are set.
	DC converter.DataConverter
}

func (s *Store) dc() converter.DataConverter {
	if s.DC == nil {
		return converter.GetDefaultDataConverter()
	}
	return s.DC
}

// Write stores out at key and returns its reference.
func (s *Store) Write(ctx context.Context, key string, out task.Output) (task.OutputRef, error) {
	p, err := s.dc().ToPayload(out)
	if err != nil {
		return task.OutputRef{}, fmt.Errorf("output %s: encode: %w", key, err)
	}
	b, err := proto.Marshal(p)
	if err != nil {
		return task.OutputRef{}, fmt.Errorf("output %s: marshal: %w", key, err)
	}
	sum := sha256.Sum256(b)
	_, err = s.Bucket.Client.PutObject(ctx, s.Bucket.Bucket, key, bytes.NewReader(b), int64(len(b)),
		minio.PutObjectOptions{ContentType: "application/x-protobuf"})
	if err != nil {
		return task.OutputRef{}, fmt.Errorf("output: put s3://%s/%s: %w", s.Bucket.Bucket, key, err)
	}
	return task.OutputRef{Key: key, Bytes: int64(len(b)), SHA256: hex.EncodeToString(sum[:]), Tokens: len(out.Tokens)}, nil
}

// Read fetches the output ref names. A missing object is a *task.Error
// ErrOutputExpired; one whose size or checksum differs from ref, or that
// does not decode, is ErrOutputCorrupt: never text the history does not
// vouch for. Anything else (the bucket unreachable) is a plain error.
func (s *Store) Read(ctx context.Context, taskID string, ref task.OutputRef) (task.Output, error) {
	where := fmt.Sprintf("task %s: output s3://%s/%s", taskID, s.Bucket.Bucket, ref.Key)
	corrupt := func(format string, args ...any) error {
		return &task.Error{Code: task.ErrOutputCorrupt, Message: where + ": " + fmt.Sprintf(format, args...)}
	}
	if ref.Bytes < 0 || ref.Bytes > MaxObject {
		return task.Output{}, corrupt("recorded size %d is out of bounds", ref.Bytes)
	}
	obj, err := s.Bucket.Client.GetObject(ctx, s.Bucket.Bucket, ref.Key, minio.GetObjectOptions{})
	if err != nil {
		return task.Output{}, s.readErr(where, err)
	}
	defer obj.Close()
	b, err := io.ReadAll(io.LimitReader(obj, ref.Bytes+1))
	if err != nil {
		return task.Output{}, s.readErr(where, err)
	}
	if int64(len(b)) != ref.Bytes {
		return task.Output{}, corrupt("%d bytes, the history records %d", len(b), ref.Bytes)
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != ref.SHA256 {
		return task.Output{}, corrupt("sha256 %x, the history records %s (the object was changed)", sum, ref.SHA256)
	}
	var p commonpb.Payload
	if err := proto.Unmarshal(b, &p); err != nil {
		return task.Output{}, corrupt("%v", err)
	}
	var out task.Output
	if err := s.dc().FromPayload(&p, &out); err != nil {
		// Under a key id this process lacks: the codec's error names it.
		return task.Output{}, corrupt("%v", err)
	}
	if len(out.Tokens) != len(out.Pieces) {
		return task.Output{}, corrupt("%d tokens but %d pieces", len(out.Tokens), len(out.Pieces))
	}
	return out, nil
}

func (s *Store) readErr(where string, err error) error {
	r := minio.ToErrorResponse(err)
	if r.Code == minio.NoSuchKey || r.StatusCode == http.StatusNotFound && r.Code != minio.NoSuchBucket {
		return &task.Error{Code: task.ErrOutputExpired, Message: where + ": gone (outputs are kept for the output retention)"}
	}
	return fmt.Errorf("%s: %w", where, err)
}

// Prune deletes the outputs written before cutoff; how many it deleted.
func (s *Store) Prune(ctx context.Context, cutoff time.Time) (int, error) {
	n := 0
	var errs []error
	for obj := range s.Bucket.Client.ListObjects(ctx, s.Bucket.Bucket, minio.ListObjectsOptions{Prefix: Prefix, Recursive: true}) {
		if obj.Err != nil {
			return n, fmt.Errorf("outputs: list s3://%s/%s: %w", s.Bucket.Bucket, Prefix, obj.Err)
		}
		if !obj.LastModified.Before(cutoff) {
			continue
		}
		if err := s.Bucket.Client.RemoveObject(ctx, s.Bucket.Bucket, obj.Key, minio.RemoveObjectOptions{}); err != nil {
			errs = append(errs, fmt.Errorf("outputs: delete s3://%s/%s: %w", s.Bucket.Bucket, obj.Key, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Pruner deletes outputs older than Retention, every Every: the control
// plane's side of the bound on the bucket (nodes may not delete). Every
// apiserver replica runs one; deletes are idempotent, so they need no
// leader.
type Pruner struct {
	Store     *Store
	Retention time.Duration
	Every     time.Duration
	Log       *slog.Logger
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
}

// Run prunes until ctx ends, once at start.
func (p *Pruner) Run(ctx context.Context) {
	now := p.Now
	if now == nil {
		now = time.Now
	}
	t := time.NewTicker(p.Every)
	defer t.Stop()
	for {
		n, err := p.Store.Prune(ctx, now().Add(-p.Retention))
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			p.Log.Warn("outputs: prune failed; the next run tries again", "deleted", n, "err", err)
		case n > 0:
			p.Log.Info("outputs: pruned", "deleted", n, "retention", p.Retention)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
