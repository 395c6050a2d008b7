package engine

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"
)

// tokenHold is how long a completion's token events may wait in the
// response buffer after a flush that carried one: a burst then reaches
// the reader (the node's worker) in one write, one wake-up and one read
// instead of one per token. The first token after a quiet spell goes at
// once, and the final event flushes what waits, so neither the first token
// nor the end is held. As node.LinkFlushInterval on the node link.
const tokenHold = 5 * time.Millisecond

// tokenWriter writes a streamed completion's token events, coalesced.
type tokenWriter struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	rc      *http.ResponseController
	last    time.Time // the last flush
	pending bool      // written since the last flush
	timer   *time.Timer
	stopped bool
}

func newTokenWriter(w http.ResponseWriter) *tokenWriter {
	return &tokenWriter{w: w, rc: http.NewResponseController(w)}
}

// event writes one `data: ` event, flushing it at once when the last
// flush is older than tokenHold, else within tokenHold.
func (t *tokenWriter) event(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.w.Write(append(append([]byte("data: "), b...), '\n', '\n')); err != nil {
		return err
	}
	wait := tokenHold - time.Since(t.last)
	if wait <= 0 {
		return t.flushLocked()
	}
	t.pending = true
	if t.timer == nil {
		t.timer = time.AfterFunc(wait, t.flushLater)
	} else {
		t.timer.Reset(wait)
	}
	return nil
}

func (t *tokenWriter) flushLater() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.stopped && t.pending {
		_ = t.flushLocked()
	}
}

func (t *tokenWriter) flushLocked() error {
	t.pending, t.last = false, time.Now()
	return t.rc.Flush()
}

// stop flushes what waits; nothing is written through t after it (the
// handler writes its final event itself).
func (t *tokenWriter) stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	if t.timer != nil {
		t.timer.Stop()
	}
	if t.pending {
		_ = t.flushLocked()
	}
}
