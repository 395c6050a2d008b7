package outputs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/proto"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

func bucket(t *testing.T) *modelstore.Store {
	t.Helper()
	s, err := modelstore.New(env.S3)
	require.NoError(t, err)
	require.NoError(t, s.EnsureBucket(context.Background()))
	return s
}

func sample(secret string) task.Output {
	out := task.Output{}
	for i := range 50 {
		out.Tokens = append(out.Tokens, int32(1000+i))
		out.Pieces = append(out.Pieces, fmt.Sprintf("%s-%d ", secret, i))
	}
	return out
}

func taskErr(t *testing.T, err error, code string) *task.Error {
	t.Helper()
	var te *task.Error
	require.True(t, errors.As(err, &te), "want a %s task error, got %v", code, err)
	require.Equal(t, code, te.Code, te.Message)
	return te
}

// With codec keys, the object is an encrypted payload under the current
// key (no plaintext in the bucket), and reads back whole, also through a
// rotated key list; a process without the key refuses it naming the id.
func TestOutputEncryptedRoundTrip(t *testing.T) {
	ctx := context.Background()
	b := bucket(t)
	k1 := codec.NewKey("k1")
	c, err := codec.Parse(k1)
	require.NoError(t, err)
	s := &outputs.Store{Bucket: b, DC: codec.DataConverter(c)}
	secret := "zebra" + fmt.Sprintf("%x", testenv.RandomBytes(t, 4))
	out := sample(secret)
	key := outputs.Key(testenv.Unique("t-enc"), "5", 1)
	ref, err := s.Write(ctx, key, out)
	require.NoError(t, err)
	require.Equal(t, key, ref.Key)
	require.Equal(t, 50, ref.Tokens)

	raw := testenv.ReadObject(t, b.Client, b.Bucket, key)
	require.EqualValues(t, ref.Bytes, len(raw))
	require.NotContains(t, string(raw), secret)
	var p commonpb.Payload
	require.NoError(t, proto.Unmarshal(raw, &p))
	require.Equal(t, codec.MetadataEncodingEncrypted, string(p.GetMetadata()[converter.MetadataEncoding]))
	require.Equal(t, "k1", string(p.GetMetadata()[codec.MetadataEncryptionKeyID]))

	got, err := s.Read(ctx, "t", ref)
	require.NoError(t, err)
	require.Equal(t, out, got)

	rotated, err := codec.Parse(codec.NewKey("k2") + "," + k1)
	require.NoError(t, err)
	got, err = (&outputs.Store{Bucket: b, DC: codec.DataConverter(rotated)}).Read(ctx, "t", ref)
	require.NoError(t, err)
	require.Equal(t, out, got, "a rotated key list still reads it")

	other, err := codec.Parse(codec.NewKey("k9"))
	require.NoError(t, err)
	_, err = (&outputs.Store{Bucket: b, DC: codec.DataConverter(other)}).Read(ctx, "t", ref)
	te := taskErr(t, err, task.ErrOutputCorrupt)
	require.Contains(t, te.Message, `"k1"`)
}

// Without keys the object is a plain payload, as history would be.
func TestOutputPlainRoundTrip(t *testing.T) {
	ctx := context.Background()
	s := &outputs.Store{Bucket: bucket(t)}
	out := sample("plain")
	ref, err := s.Write(ctx, outputs.Key(testenv.Unique("t-plain"), "5", 1), out)
	require.NoError(t, err)
	got, err := s.Read(ctx, "t", ref)
	require.NoError(t, err)
	require.Equal(t, out, got)
}

// A changed object is refused, however it was changed (a flipped byte, a
// valid output of other text, a truncation); a missing one is expired.
func TestOutputTamperedOrMissing(t *testing.T) {
	ctx := context.Background()
	b := bucket(t)
	s := &outputs.Store{Bucket: b}
	key := outputs.Key(testenv.Unique("t-tamper"), "5", 1)
	ref, err := s.Write(ctx, key, sample("original"))
	require.NoError(t, err)
	raw := testenv.ReadObject(t, b.Client, b.Bucket, key)

	flipped := append([]byte(nil), raw...)
	i := bytes.Index(flipped, []byte("original"))
	require.GreaterOrEqual(t, i, 0)
	flipped[i] = 'O'
	testenv.PutObject(t, b.Client, b.Bucket, key, flipped)
	_, err = s.Read(ctx, "t-tamper", ref)
	te := taskErr(t, err, task.ErrOutputCorrupt)
	require.Contains(t, te.Message, "sha256")
	require.Contains(t, te.Message, "t-tamper")

	_, err = s.Write(ctx, key, sample("imposter"))
	require.NoError(t, err)
	_, err = s.Read(ctx, "t", ref)
	taskErr(t, err, task.ErrOutputCorrupt)

	testenv.PutObject(t, b.Client, b.Bucket, key, raw[:len(raw)/2])
	_, err = s.Read(ctx, "t", ref)
	taskErr(t, err, task.ErrOutputCorrupt)

	testenv.PutObject(t, b.Client, b.Bucket, key, raw)
	_, err = s.Read(ctx, "t", ref)
	require.NoError(t, err, "the original bytes read again")

	require.NoError(t, b.Client.RemoveObject(ctx, b.Bucket, key, minio.RemoveObjectOptions{}))
	_, err = s.Read(ctx, "t", ref)
	taskErr(t, err, task.ErrOutputExpired)
}

// Prune deletes the outputs written before the cutoff, and only outputs.
func TestPrune(t *testing.T) {
	ctx := context.Background()
	b := bucket(t)
	s := &outputs.Store{Bucket: b}
	id := testenv.Unique("t-prune")
	var keys []string
	for a := range 3 {
		k := outputs.Key(id, "5", int32(a+1))
		_, err := s.Write(ctx, k, sample("old"))
		require.NoError(t, err)
		keys = append(keys, k)
	}
	other := "catalog/prune-" + id + ".json"
	testenv.PutObject(t, b.Client, b.Bucket, other, []byte("{}"))
	t.Cleanup(func() { _ = b.Client.RemoveObject(ctx, b.Bucket, other, minio.RemoveObjectOptions{}) })

	n, err := s.Prune(ctx, time.Now().Add(-time.Hour))
	require.NoError(t, err)
	require.Zero(t, n, "nothing is an hour old")
	for _, k := range keys {
		_, err := b.Stat(ctx, k)
		require.NoError(t, err)
	}
	n, err = s.Prune(ctx, time.Now().Add(time.Hour))
	require.NoError(t, err)
	require.GreaterOrEqual(t, n, 3)
	for _, k := range keys {
		_, err := b.Stat(ctx, k)
		require.ErrorIs(t, err, modelstore.ErrObjectMissing, k)
	}
	_, err = b.Stat(ctx, other)
	require.NoError(t, err, "objects outside outputs/ stay")
	require.True(t, strings.HasPrefix(keys[0], outputs.Prefix))
}
