package lease

import (
	"context"
	"fmt"
	"os"
	"time"
)

// Watch ends an engine nobody supervises. The node's supervisor touches
// the lease file every second; an engine keeps running through a worker
// restart (so the new worker can adopt it) but not for longer than timeout
// without a supervisor, so a worker that never returns leaves no orphan.
// The channel receives once the lease has lapsed (or the file is gone for
// longer than timeout), naming why.
func Watch(ctx context.Context, path string, timeout time.Duration) <-chan error {
	out := make(chan error, 1)
	go func() {
		started := time.Now()
		tick := time.NewTicker(max(timeout/8, 50*time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			last := started
			if st, err := os.Stat(path); err == nil && st.ModTime().After(last) {
				last = st.ModTime()
			}
			if idle := time.Since(last); idle > timeout {
				out <- fmt.Errorf("no supervisor for %s (lease %s not renewed; timeout %s)", idle.Round(time.Millisecond), path, timeout)
				return
			}
		}
	}()
	return out
}

// Touch renews a lease file, creating it if needed.
func Touch(path string) error {
	now := time.Now()
	if err := os.Chtimes(path, now, now); err == nil {
		return nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}
