// Package tokenstream carries a task's tokens out of band (DESIGN.md
// decision 5). The node's generation activity writes each task's events
// into the node's Hub, which the node link serves (docs/node-link.md, "Task
// streams"); on every apiserver replica with a reader of the task, one
// Follower subscribes to that node's stream and feeds the replica's own
// Hub, which fans the events out to SSE readers. Nothing here enters
// workflow history.
//
// Invariants:
//   - a stream's tokens are contiguous by index from its base (0 unless
//     opened with Hub.Open at a base): a push is idempotent by index and a
//     gap is refused (ErrGap), so a subscriber that lost its connection
//     resumes from what it holds, with no gap and no duplicate;
//   - nothing is taken after the final event (end or error): a canceled
//     task delivers no token after its cancel;
//   - a stream goes away Keep after it finished, or Keep after it was
//     created if it never got an event (a reader asking for a task that
//     never comes leaks nothing).
//
// Pusher is the older path, kept for tasks an older apiserver admitted
// during a rolling upgrade: the node pushes batches to the admitting
// apiserver's /internal/v1/streams route.
package tokenstream

import (
	"context"
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
	swept   time.Time     // last gc
	added   chan struct{} // closed (and replaced) when a stream is added
}

// Stream is one task's events: started, tokens by index, metrics, and the
// final end or error.
type Stream struct {
	mu       sync.Mutex
	base     int // index of tokens[0]: indexes below are not held here
	created  time.Time
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
		s = h.add(taskID, 0)
	}
	h.gc()
	return s
}

// Open starts a new stream for the task whose first token is base,
// replacing any stream held (a later generation of the task on this node).
// A replaced stream that had not ended ends with a retriable WORKER_RESET,
// so its readers look again.
func (h *Hub) Open(taskID string, base int) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	if old := h.streams[taskID]; old != nil {
		old.Finish(task.Event{Type: "error", Error: &task.Error{Code: task.ErrWorkerReset, Retriable: true, RetryAfterMs: 1000,
			Message: "a newer generation of task " + taskID + " replaced this stream"}})
	}
	s := h.add(taskID, base)
	h.gc()
	return s
}

// add creates the stream and wakes Wait. Called with h.mu held.
func (h *Hub) add(taskID string, base int) *Stream {
	if h.streams == nil {
		h.streams = map[string]*Stream{}
	}
	s := &Stream{base: base, created: time.Now(), changed: make(chan struct{})}
	h.streams[taskID] = s
	if h.added != nil {
		close(h.added)
		h.added = nil
	}
	return s
}

// Wait returns the task's stream once the hub holds one, or nil when ctx
// ends first. It creates nothing.
func (h *Hub) Wait(ctx context.Context, taskID string) *Stream {
	for {
		h.mu.Lock()
		s := h.streams[taskID]
		if s == nil && h.added == nil {
			h.added = make(chan struct{})
		}
		added := h.added
		h.mu.Unlock()
		if s != nil {
			return s
		}
		select {
		case <-added:
		case <-ctx.Done():
			return nil
		}
	}
}

// Len is how many streams the hub holds.
func (h *Hub) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.streams)
}

// gc drops streams finished longer than Keep ago, and streams that never
// got an event and were created longer than Keep ago. It sweeps at most
// once per tenth of Keep: Stream is on the path of every push and reader.
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
		empty := s.started == nil && len(s.tokens) == 0 && len(s.metrics) == 0 && s.final == nil
		old = old || (empty && time.Since(s.created) > keep)
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
			return s.base + len(s.tokens), nil
		}
		switch ev.Type {
		case "started":
			if s.started == nil {
				e := ev
				s.started, changed = &e, true
			}
		case "token":
			switch next := s.base + len(s.tokens); {
			case ev.I < next:
				continue
			case ev.I > next:
				return next, ErrGap
			}
			s.tokens, changed = append(s.tokens, ev), true
		case "metrics":
			s.metrics, changed = append(s.metrics, ev), true
		case "end", "error":
			e := ev
			s.final, s.finished, changed = &e, time.Now(), true
		}
	}
	return s.base + len(s.tokens), nil
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
// closes when more arrive. A cursor below the stream's base gets the tokens
// from the base (those below are not held here).
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
	c.Next = max(c.Next, s.base)
	for ; c.Next < s.base+len(s.tokens); c.Next++ {
		out = append(out, s.tokens[c.Next-s.base])
	}
	if !c.Done && s.final != nil {
		out = append(out, *s.final)
		c.Done = true
	}
	return out, c, s.changed
}

// Tokens is the index after the last token the stream holds (its base
// plus the tokens held).
func (s *Stream) Tokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.base + len(s.tokens)
}

// Base is the index of the first token the stream can hold.
func (s *Stream) Base() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.base
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

// Progress is the tokens the stream holds, as a generation resumes from;
// empty for a stream with a base (it lacks the first tokens).
func (s *Stream) Progress() task.Progress {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.base > 0 {
		return task.Progress{}
	}
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
