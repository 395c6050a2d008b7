package modelstore

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/llorch/llorch/config"
)

// ErrObjectMissing is wrapped by Stat (and what builds on it) when the bucket
// holds no object at the key.
var ErrObjectMissing = errors.New("object missing")

// Store is the bucket that holds the models and the catalog entries.
type Store struct {
	Client   *minio.Client
	Bucket   string
	Endpoint string
}

// New connects to the object store cfg names (MinIO in production,
// versitygw in dev and tests) with static v4 credentials. It sends nothing.
func New(cfg config.S3) (*Store, error) {
	if cfg.Endpoint == "" {
		return nil, errors.New("modelstore: no S3 endpoint (set --s3-endpoint or LLORCH_S3_ENDPOINT)")
	}
	if cfg.Bucket == "" {
		return nil, errors.New("modelstore: no S3 bucket (set --s3-bucket or LLORCH_S3_BUCKET)")
	}
	cl, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""),
		Secure: cfg.TLS,
		Region: cfg.Region,
	})
	if err != nil {
		return nil, fmt.Errorf("modelstore: S3 client for %s: %w", cfg.Endpoint, err)
	}
	return &Store{Client: cl, Bucket: cfg.Bucket, Endpoint: cfg.Endpoint}, nil
}

// EnsureBucket creates the bucket unless it exists.
func (s *Store) EnsureBucket(ctx context.Context) error {
	ok, err := s.Client.BucketExists(ctx, s.Bucket)
	if err != nil {
		return fmt.Errorf("modelstore: check bucket %s at %s: %w", s.Bucket, s.Endpoint, err)
	}
	if ok {
		return nil
	}
	// An empty region is the client's own (config.S3.Region).
	if err := s.Client.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{}); err != nil {
		// Another process may have created it between the two calls.
		switch minio.ToErrorResponse(err).Code {
		case minio.BucketAlreadyOwnedByYou, minio.BucketAlreadyExists:
			return nil
		}
		return fmt.Errorf("modelstore: create bucket %s at %s: %w", s.Bucket, s.Endpoint, err)
	}
	return nil
}

// Stat describes the object at key; a missing object wraps ErrObjectMissing.
func (s *Store) Stat(ctx context.Context, key string) (minio.ObjectInfo, error) {
	info, err := s.Client.StatObject(ctx, s.Bucket, key, minio.StatObjectOptions{})
	if err != nil {
		if isNotFound(err) {
			return minio.ObjectInfo{}, fmt.Errorf("%w: s3://%s/%s", ErrObjectMissing, s.Bucket, key)
		}
		return minio.ObjectInfo{}, fmt.Errorf("modelstore: stat s3://%s/%s: %w", s.Bucket, key, err)
	}
	return info, nil
}

// PresignGet is a URL that fetches the object at key without credentials
// until ttl passes. It does not check that the object exists.
func (s *Store) PresignGet(ctx context.Context, key string, ttl time.Duration) (string, error) {
	u, err := s.Client.PresignedGetObject(ctx, s.Bucket, key, ttl, nil)
	if err != nil {
		return "", fmt.Errorf("modelstore: presign s3://%s/%s: %w", s.Bucket, key, err)
	}
	return u.String(), nil
}

// isNotFound says whether err is S3's "no such key" (a HEAD answers a bare 404).
func isNotFound(err error) bool {
	r := minio.ToErrorResponse(err)
	return r.Code == minio.NoSuchKey || r.StatusCode == http.StatusNotFound && r.Code != minio.NoSuchBucket
}
