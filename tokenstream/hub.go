// Package tokenstream carries a task's tokens out of band (DESIGN.md
// decision 5): the node's generation activity pushes batches of events over
// authenticated HTTP to the apiserver that admitted the task; the Hub keeps
// each task's events and fans them out to SSE readers. Nothing here enters
// workflow history. Pushes are idempotent by token index, so a pusher that
// lost its connection, or an apiserver that restarted with an empty Hub,
// recovers by resending from the start.
package tokenstream

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"github.com/llorch/llorch/task"
)

// ErrGap says a push skipped tokens the hub does not have; the pusher
// resends from Have.
var ErrGap = errors.New("token gap")

// Hub holds the event streams of tasks this apiserver admitted or serves.
type Hub struct {
	// Keep is how long a finished stream stays for late readers; after that
	// readers get the recorded result from the workflow.
	Keep time.Duration

	mu      sync.Mutex
	streams map[string]*Stream
	swept   time.Time // last gc
}

// Stream is one task's events: started, tokens by index, metrics, and the
// final end or error.
type Stream struct {
	mu       sync.Mutex
	started  *task.Event
	tokens   []task.Event
	metrics  []task.Event
	final    *task.Event
	changed  chan struct{}
	finished time.Time
}

// Stream returns the task's stream, creating it.
func (h *Hub) Stream(taskID string) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.streams == nil {
		h.streams = map[string]*Stream{}
	}
	s := h.streams[taskID]
	if s == nil {
		s = &Stream{changed: make(chan struct{})}
		h.streams[taskID] = s
	}
	h.gc()
	return s
}

// gc drops streams finished longer than Keep ago. It sweeps at most once
// per tenth of Keep: Stream is on the path of every push and reader.
// Called with h.mu held.
func (h *Hub) gc() {
	keep := h.Keep
	if keep <= 0 {
		keep = 10 * time.Minute
	}
	if time.Since(h.swept) < keep/10 {
		return
	}
	h.swept = time.Now()
	for id, s := range h.streams {
		s.mu.Lock()
		old := s.final != nil && time.Since(s.finished) > keep
		s.mu.Unlock()
		if old {
			delete(h.streams, id)
		}
	}
}

func (s *Stream) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Push appends a batch. Tokens already held are skipped (a resend); a token
// past the next index is a gap: nothing after it is taken and ErrGap says
// where to resume. Events after the final one are dropped (a canceled
// task delivers no token after its cancel).
func (s *Stream) Push(evs []task.Event) (have int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	defer func() {
		if changed {
			s.notify()
		}
	}()
	for _, ev := range evs {
		if s.final != nil {
			return len(s.tokens), nil
		}
		switch ev.Type {
		case "started":
			if s.started == nil {
				e := ev
				s.started, changed = &e, true
			}
		case "token":
			switch {
			case ev.I < len(s.tokens):
				continue
			case ev.I > len(s.tokens):
				return len(s.tokens), ErrGap
			}
			s.tokens, changed = append(s.tokens, ev), true
		case "metrics":
			s.metrics, changed = append(s.metrics, ev), true
		case "end", "error":
			e := ev
			s.final, s.finished, changed = &e, time.Now(), true
		}
	}
	return len(s.tokens), nil
}

// Finish ends the stream with ev unless it has ended; it reports whether ev
// was taken.
func (s *Stream) Finish(ev task.Event) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.final != nil {
		return false
	}
	s.final, s.finished = &ev, time.Now()
	s.notify()
	return true
}

// Cursor is a reader's place in a stream.
type Cursor struct {
	Started bool // the started event was delivered
	Next    int  // the next token index to deliver
	Metrics int  // metrics events delivered
	Done    bool // the final event was delivered
}

// Read returns the events after c, the advanced cursor, and a channel that
// closes when more arrive.
func (s *Stream) Read(c Cursor) ([]task.Event, Cursor, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []task.Event
	if !c.Started && s.started != nil {
		out = append(out, *s.started)
		c.Started = true
	}
	for ; c.Metrics < len(s.metrics); c.Metrics++ {
		out = append(out, s.metrics[c.Metrics])
	}
	for ; c.Next < len(s.tokens); c.Next++ {
		out = append(out, s.tokens[c.Next])
	}
	if !c.Done && s.final != nil {
		out = append(out, *s.final)
		c.Done = true
	}
	return out, c, s.changed
}

// Tokens is how many tokens the stream holds.
func (s *Stream) Tokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tokens)
}

// Ended says whether the stream has its final event.
func (s *Stream) Ended() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.final != nil
}

// SinkToken is the credential a node pushes a task's events with: an HMAC
// of the task id under the apiserver's key, so the apiserver checks it
// without state, also after a restart.
func SinkToken(key []byte, taskID string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(taskID))
	return hex.EncodeToString(m.Sum(nil))
}

// CheckSinkToken compares in constant time.
func CheckSinkToken(key []byte, taskID, got string) bool {
	return hmac.Equal([]byte(SinkToken(key, taskID)), []byte(got))
}

// Progress is the tokens the stream holds, as a generation resumes from.
func (s *Stream) Progress() task.Progress {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := task.Progress{Tokens: make([]int32, len(s.tokens)), Pieces: make([]string, len(s.tokens))}
	for i, ev := range s.tokens {
		p.Tokens[i], p.Pieces[i] = ev.Tok, ev.T
	}
	return p
}

// Peek returns the task's stream if the hub holds one.
func (h *Hub) Peek(taskID string) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.streams[taskID]
}
