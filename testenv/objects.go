package testenv

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/minio/minio-go/v7"
	"github.com/stretchr/testify/require"
)

// ReadObject is the bytes of object key in bucket, as stored: what a test
// inspects (ciphertext, a checksum) below the code that reads it.
func ReadObject(t testing.TB, c *minio.Client, bucket, key string) []byte {
	t.Helper()
	o, err := c.GetObject(context.Background(), bucket, key, minio.GetObjectOptions{})
	require.NoError(t, err)
	defer o.Close()
	b, err := io.ReadAll(o)
	require.NoError(t, err)
	return b
}

// PutObject writes b as object key in bucket, past the code that would
// (a test tampering with what it stored).
func PutObject(t testing.TB, c *minio.Client, bucket, key string, b []byte) {
	t.Helper()
	_, err := c.PutObject(context.Background(), bucket, key, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{})
	require.NoError(t, err)
}
