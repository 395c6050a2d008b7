package lease

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestLeaseLapsesWithoutRenewal(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p@1.lease")
	require.NoError(t, Touch(path))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Generous against a loaded machine's stalls; renewals come every 50 ms.
	const timeout = 2 * time.Second
	lapsed := Watch(ctx, path, timeout)

	// Renewed well within the timeout for longer than the timeout: it holds.
	renewUntil := time.Now().Add(3 * timeout / 2)
	for time.Now().Before(renewUntil) {
		require.NoError(t, Touch(path))
		select {
		case err := <-lapsed:
			t.Fatalf("lease lapsed while renewed: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	// Not renewed: it lapses, and says why.
	select {
	case err := <-lapsed:
		require.ErrorContains(t, err, "no supervisor")
	case <-time.After(30 * time.Second):
		t.Fatal("lease never lapsed")
	}
}

func TestLeaseMissingFileLapses(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	select {
	case err := <-Watch(ctx, filepath.Join(t.TempDir(), "never"), 100*time.Millisecond):
		require.ErrorContains(t, err, "not renewed")
	case <-time.After(30 * time.Second):
		t.Fatal("a lease never written never lapsed")
	}
}
