package keyring

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/testenv"
)

// failing is a registry out of reach after its first answer (fault
// injection: the real registry is tested in apiserver and e2e).
type failing struct {
	snap  apikey.Snapshot
	calls int
}

func (f *failing) Snapshot(context.Context, int64) (apikey.Snapshot, error) {
	f.calls++
	if f.calls > 1 {
		return apikey.Snapshot{}, errors.New("temporal unreachable")
	}
	return f.snap, nil
}

// A token is refused for each reason it can be; a ring whose registry is
// out of reach for longer than MaxStale refuses every key (fails closed).
func TestLookupRefusals(t *testing.T) {
	id, tok, err := apikey.NewToken()
	require.NoError(t, err)
	expID, expTok, _ := apikey.NewToken()
	revID, revTok, _ := apikey.NewToken()
	now := time.Now()
	src := &failing{snap: apikey.Snapshot{Version: 3, StreamKey: []byte("k"), Keys: []apikey.Record{
		{ID: id, Name: "ok", Scopes: []apikey.Scope{apikey.Inference}, Hash: apikey.Hash(tok)},
		{ID: expID, Name: "exp", Scopes: []apikey.Scope{apikey.Inference}, Hash: apikey.Hash(expTok), ExpiresAt: now.Add(-time.Second)},
		{ID: revID, Name: "rev", Scopes: []apikey.Scope{apikey.Inference}, Hash: apikey.Hash(revTok), RevokedAt: now},
	}}}
	r := &Ring{Source: src, MaxStale: 200 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	_, reason := r.lookup(tok)
	require.Equal(t, ReasonMalformed, func() string { _, x := r.lookup("not-a-key"); return x }())
	require.Equal(t, ReasonStale, reason, "nothing read yet")
	require.NoError(t, r.Load(context.Background()))
	p, ok := r.Lookup(tok)
	require.True(t, ok)
	require.Equal(t, id, p.KeyID)
	require.Equal(t, []byte("k"), r.StreamKey())
	for want, token := range map[string]string{
		ReasonExpired: expTok, ReasonRevoked: revTok, ReasonMismatch: tok[:len(tok)-1] + "x",
		ReasonUnknown: "llk_k0123456789abcdef_secret",
	} {
		_, got := r.lookup(token)
		require.Equal(t, want, got)
	}
	require.Error(t, r.Load(context.Background()))
	testenv.Eventually(t, 5*time.Second, "a stale copy refuses every key", func() (bool, string) {
		_, reason := r.lookup(tok)
		return reason == ReasonStale, reason
	})
}
