package modelstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/minio/minio-go/v7"
)

// DefaultUnknownSizePartSize is the part size of an upload of unknown size:
// minio-go buffers one part in memory, and its own default for an unknown
// size is about 537 MiB. 10,000 parts of 64 MiB carry 625 GiB.
const DefaultUnknownSizePartSize = 64 << 20

// cleanupTimeout bounds the removal of a failed upload's object, which runs
// even when the upload's context was cancelled.
const cleanupTimeout = 30 * time.Second

// UploadOption adjusts an Upload.
type UploadOption func(*minio.PutObjectOptions)

// PartSize sets the multipart part size (S3's minimum is 5 MiB). Objects no
// larger than one part go in a single PUT.
func PartSize(n uint64) UploadOption {
	return func(o *minio.PutObjectOptions) { o.PartSize = n }
}

// UserMetadata stores x-amz-meta-* headers with the object; Stat returns
// them in ObjectInfo.UserMetadata (keys canonicalised, e.g. "Sha256").
func UserMetadata(m map[string]string) UploadOption {
	return func(o *minio.PutObjectOptions) {
		if o.UserMetadata == nil {
			o.UserMetadata = map[string]string{}
		}
		for k, v := range m {
			o.UserMetadata[k] = v
		}
	}
}

// Upload streams r to key (a multipart upload when larger than one part;
// size -1 when unknown) and returns the sha256 of the bytes sent, computed
// as they go out. progress, if not nil, sees every byte too (a progress
// bar; its write errors are ignored). On any error the object is not left at key: minio-go aborts an
// incomplete multipart upload, and an object the failed call did write is
// removed (an object that was there before and was not replaced is kept).
func (s *Store) Upload(ctx context.Context, r io.Reader, size int64, key string, progress io.Writer, opts ...UploadOption) (string, error) {
	// What was at key before, so a cleanup only removes what this call wrote.
	var prior *minio.ObjectInfo
	if info, err := s.Stat(ctx, key); err == nil {
		prior = &info
	} else if !errors.Is(err, ErrObjectMissing) {
		return "", err
	}

	h := sha256.New()
	var n countWriter
	sinks := []io.Writer{h, &n}
	if progress != nil {
		sinks = append(sinks, ignoreErrors{progress})
	}
	po := minio.PutObjectOptions{ContentType: "application/octet-stream"}
	for _, o := range opts {
		o(&po)
	}
	if size < 0 && po.PartSize == 0 {
		po.PartSize = DefaultUnknownSizePartSize
	}
	start := time.Now()
	info, err := s.Client.PutObject(ctx, s.Bucket, key, io.TeeReader(r, io.MultiWriter(sinks...)), size, po)
	switch {
	case err != nil:
		err = fmt.Errorf("modelstore: upload s3://%s/%s failed after %d bytes in %s: %w",
			s.Bucket, key, int64(n), time.Since(start).Round(time.Millisecond), err)
	case size >= 0 && int64(n) != size:
		err = fmt.Errorf("modelstore: upload s3://%s/%s: read %d bytes, want %d", s.Bucket, key, int64(n), size)
	case info.Size != int64(n):
		err = fmt.Errorf("modelstore: upload s3://%s/%s: the store took %d bytes of the %d sent", s.Bucket, key, info.Size, int64(n))
	}
	if err != nil {
		if cerr := s.removeFailed(ctx, key, prior); cerr != nil {
			err = fmt.Errorf("%w (and cleaning up: %v)", err, cerr)
		}
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// removeFailed removes the object a failed upload left at key, if any.
func (s *Store) removeFailed(ctx context.Context, key string, prior *minio.ObjectInfo) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	now, err := s.Stat(ctx, key)
	if errors.Is(err, ErrObjectMissing) {
		return nil
	}
	if err != nil {
		return err
	}
	if prior != nil && now.ETag == prior.ETag && now.LastModified.Equal(prior.LastModified) {
		return nil // the upload never replaced the object that was there
	}
	return s.Remove(ctx, key)
}

// Remove deletes the object at key; a missing object is not an error.
func (s *Store) Remove(ctx context.Context, key string) error {
	if err := s.Client.RemoveObject(ctx, s.Bucket, key, minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("modelstore: remove s3://%s/%s: %w", s.Bucket, key, err)
	}
	return nil
}

// HashObject streams the object at key through sha256. A missing object
// wraps ErrObjectMissing.
func (s *Store) HashObject(ctx context.Context, key string) (sha string, size int64, err error) {
	obj, err := s.Client.GetObject(ctx, s.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return "", 0, s.readErr(key, err)
	}
	defer obj.Close()
	h := sha256.New()
	size, err = io.Copy(h, obj)
	if err != nil {
		return "", 0, s.readErr(key, err)
	}
	return hex.EncodeToString(h.Sum(nil)), size, nil
}

func (s *Store) readErr(key string, err error) error {
	if isNotFound(err) {
		return fmt.Errorf("%w: s3://%s/%s", ErrObjectMissing, s.Bucket, key)
	}
	return fmt.Errorf("modelstore: read s3://%s/%s: %w", s.Bucket, key, err)
}

// ignoreErrors keeps a progress display's failure from failing an upload.
type ignoreErrors struct{ w io.Writer }

func (i ignoreErrors) Write(p []byte) (int, error) {
	_, _ = i.w.Write(p)
	return len(p), nil
}

type countWriter int64

func (c *countWriter) Write(p []byte) (int, error) {
	*c += countWriter(len(p))
	return len(p), nil
}
