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
//   - a stream goes away Keep after it finished, or Keep after its last
//     event or reader if it never finishes (a reader asking for a task
//     that never comes, a task that failed with nobody reading, leak
//     nothing); a stream and the hub are bounded (Hub's Max fields): at a
//     bound the stream ends with CodeStreamLimit rather than growing.
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
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/llorch/llorch/task"
)

// ErrGap says a push skipped tokens the hub does not have; the pusher
// resends from Have.
var ErrGap = errors.New("token gap")

// Error codes a stream ends with when the hub drops or bounds it.
const (
	// CodeStreamLimit: the stream reached a bound of the hub (its tokens or
	// bytes, the bytes of all streams, or the number of streams); the
	// task's recorded result holds its output.
	CodeStreamLimit = "STREAM_LIMIT"
	// CodeStreamExpired: the stream got no event and had no reader for
	// Keep; a reader looks again.
	CodeStreamExpired = "STREAM_EXPIRED"
)

// Default bounds of a Hub. A stream's tokens are bounded above the largest
// context lengths in use (1M tokens); a token costs about 24 bytes plus its
// text, so a stream at the token bound holds about 32 MiB.
const (
	DefaultKeep           = 10 * time.Minute
	DefaultMaxStreams     = 1 << 16
	DefaultMaxTokens      = 1 << 20
	DefaultMaxStreamBytes = 64 << 20
	DefaultMaxBytes       = 1 << 30
)

// Hub holds the event streams of tasks this apiserver admitted or serves
// (and, on a node, of the tasks it generates). Its memory is bounded: a
// stream goes away Keep after it finished, or Keep after its last event or
// reader if it never finishes (a task that failed with no reader attached);
// a stream past its bounds, or one that would take the hub past its own,
// ends with a CodeStreamLimit error instead of growing.
type Hub struct {
	// Keep is how long a finished stream stays for late readers, and an
	// unfinished one with no event and no reader; after that readers get
	// the recorded result from the workflow. 0: DefaultKeep.
	Keep time.Duration
	// MaxStreams bounds the streams held; 0: DefaultMaxStreams.
	MaxStreams int
	// MaxTokens bounds one stream's tokens; 0: DefaultMaxTokens.
	MaxTokens int
	// MaxStreamBytes bounds one stream's events, in bytes of memory as
	// estimated; 0: DefaultMaxStreamBytes.
	MaxStreamBytes int64
	// MaxBytes bounds the events of all streams; 0: DefaultMaxBytes.
	MaxBytes int64

	mu      sync.Mutex
	streams map[string]*Stream
	swept   time.Time     // last gc
	added   chan struct{} // closed (and replaced) when a stream is added

	// What the held streams hold; changed under each stream's lock.
	events, bytes atomic.Int64
	limited       atomic.Int64 // streams ended at a bound
}

// Stream is one task's events: started, tokens by index, metrics, and the
// final end or error.
type Stream struct {
	hub *Hub   // nil: a stream of no hub (its bounds are the defaults)
	id  string // the task

	mu       sync.Mutex
	held     bool // in the hub, counted in its totals
	base     int  // index of tokens[0]: indexes below are not held here
	active   time.Time
	readers  int
	events   int64
	bytes    int64
	started  *task.Event
	tokens   []piece
	metrics  []task.Event
	final    *task.Event
	changed  chan struct{} // nil until a reader waits: a push nobody waits on allocates nothing
	done     chan struct{} // nil until Done asks; closed at the final event
	finished time.Time
}

// piece is a token as held: a token event is mostly its index, kept as
// the position.
type piece struct {
	t   string
	tok int32
	lp  *task.Logprob // when the task asked for log probabilities
}

// logprobCost estimates the memory a token's log probabilities take.
func logprobCost(lp *task.Logprob) int64 {
	if lp == nil {
		return 0
	}
	n := int64(unsafe.Sizeof(task.Logprob{})) + int64(len(lp.T)+8*len(lp.B))
	for _, t := range lp.Top {
		n += int64(unsafe.Sizeof(task.TopLogprob{})) + int64(len(t.T)+8*len(t.B))
	}
	return n
}

// Sizes behind the byte estimate of what a stream holds.
var (
	pieceSize = int64(unsafe.Sizeof(piece{}))
	eventSize = int64(unsafe.Sizeof(task.Event{}))
)

// eventCost estimates the memory an event takes once held.
func eventCost(ev task.Event) int64 {
	if ev.Type == "token" {
		return pieceSize + int64(len(ev.T)) + logprobCost(ev.LP)
	}
	n := eventSize + int64(len(ev.Type)+len(ev.T)+len(ev.NodeID)+len(ev.PoolID)+len(ev.StopType))
	n += int64(len(ev.Metrics)) * 64
	if ev.Error != nil {
		n += int64(unsafe.Sizeof(task.Error{})) + int64(len(ev.Error.Code)+len(ev.Error.Message))
	}
	return n
}

func (h *Hub) keep() time.Duration   { return orDefault(h.Keep, DefaultKeep) }
func (h *Hub) maxStreams() int       { return orDefault(h.MaxStreams, DefaultMaxStreams) }
func (h *Hub) maxTokens() int        { return orDefault(h.MaxTokens, DefaultMaxTokens) }
func (h *Hub) maxStreamBytes() int64 { return orDefault(h.MaxStreamBytes, DefaultMaxStreamBytes) }
func (h *Hub) maxBytes() int64       { return orDefault(h.MaxBytes, DefaultMaxBytes) }
func orDefault[T int | int64 | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

// Stream returns the task's stream, creating it.
func (h *Hub) Stream(taskID string) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gc(false)
	if s := h.streams[taskID]; s != nil {
		return s
	}
	return h.add(taskID, 0)
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
		h.remove(taskID, old)
	}
	h.gc(false)
	return h.add(taskID, base)
}

// add creates the stream and wakes Wait. With MaxStreams held it sheds
// finished streams first; with no room still, the stream it returns is
// not held and has ended with CodeStreamLimit. Called with h.mu held.
func (h *Hub) add(taskID string, base int) *Stream {
	if h.streams == nil {
		h.streams = map[string]*Stream{}
	}
	s := &Stream{hub: h, id: taskID, base: base, active: time.Now()}
	if len(h.streams) >= h.maxStreams() {
		h.gc(true)
		h.shed(func() bool { return len(h.streams) < h.maxStreams() })
		if len(h.streams) >= h.maxStreams() {
			h.limited.Add(1)
			s.Finish(limitEvent(taskID, fmt.Sprintf("this hub holds %d task streams, its bound", len(h.streams))))
			return s
		}
	}
	s.held = true
	h.streams[taskID] = s
	if h.added != nil {
		close(h.added)
		h.added = nil
	}
	return s
}

// remove drops a stream from the hub and its totals. Called with h.mu
// held.
func (h *Hub) remove(taskID string, s *Stream) {
	if h.streams[taskID] == s {
		delete(h.streams, taskID)
	}
	s.mu.Lock()
	if s.held {
		s.held = false
		h.events.Add(-s.events)
		h.bytes.Add(-s.bytes)
	}
	s.mu.Unlock()
}

// shed drops finished streams, the longest finished first, until enough
// says so: they are kept for late readers only, who can read the recorded
// result instead. Called with h.mu held.
func (h *Hub) shed(enough func() bool) {
	type done struct {
		id string
		s  *Stream
		at time.Time
	}
	var ended []done
	for id, s := range h.streams {
		s.mu.Lock()
		if s.final != nil {
			ended = append(ended, done{id, s, s.finished})
		}
		s.mu.Unlock()
	}
	sort.Slice(ended, func(i, j int) bool { return ended[i].at.Before(ended[j].at) })
	for _, d := range ended {
		if enough() {
			return
		}
		h.remove(d.id, d.s)
	}
}

// reclaim sheds finished streams until need more bytes fit under
// MaxBytes.
func (h *Hub) reclaim(need int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.shed(func() bool { return h.bytes.Load()+need <= h.maxBytes() })
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

// Held is what the hub holds: streams, their events, and the bytes those
// take as estimated.
func (h *Hub) Held() (streams int, events, bytes int64) {
	return h.Len(), h.events.Load(), h.bytes.Load()
}

// gc drops streams finished longer than Keep ago, and unfinished streams
// with no reader and no event for Keep (their task failed or moved with
// nobody reading here); a dropped unfinished stream ends with
// CodeStreamExpired, so whoever still holds it stops. Unless forced it
// sweeps at most once per tenth of Keep: Stream is on the path of every
// push and reader. Called with h.mu held.
func (h *Hub) gc(force bool) {
	keep := h.keep()
	if !force && time.Since(h.swept) < keep/10 {
		return
	}
	h.swept = time.Now()
	for id, s := range h.streams {
		s.mu.Lock()
		old := s.final != nil && time.Since(s.finished) > keep
		abandoned := s.final == nil && s.readers == 0 && time.Since(s.active) > keep
		if abandoned {
			s.finishLocked(task.Event{Type: "error", Error: &task.Error{Code: CodeStreamExpired, Retriable: true, RetryAfterMs: 1000,
				Message: fmt.Sprintf("the stream of task %s got no event and had no reader for %s: read the task again", id, keep)}})
		}
		s.mu.Unlock()
		if old || abandoned {
			h.remove(id, s)
		}
	}
}

func limitEvent(taskID, why string) task.Event {
	return task.Event{Type: "error", Error: &task.Error{Code: CodeStreamLimit,
		Message: "the token stream of task " + taskID + " stopped: " + why + "; the task's result holds its whole output"}}
}

// notify wakes the readers waiting. Called with s.mu held.
func (s *Stream) notify() {
	if s.changed != nil {
		close(s.changed)
		s.changed = nil
	}
	if s.final != nil && s.done != nil {
		select {
		case <-s.done:
		default:
			close(s.done)
		}
	}
}

// take counts an event held. Called with s.mu held.
func (s *Stream) take(cost int64) {
	s.events++
	s.bytes += cost
	s.active = time.Now()
	if s.held {
		s.hub.events.Add(1)
		s.hub.bytes.Add(cost)
	}
}

// bounds are the stream's: its hub's, or the defaults.
func (s *Stream) bounds() (tokens int, bytes, total int64) {
	h := s.hub
	if h == nil {
		h = &Hub{}
	}
	return h.maxTokens(), h.maxStreamBytes(), h.maxBytes()
}

// Push appends a batch. Tokens already held are skipped (a resend); a token
// past the next index is a gap: nothing after it is taken and ErrGap says
// where to resume. Events after the final one are dropped (a canceled
// task delivers no token after its cancel). A batch past a bound ends the
// stream with CodeStreamLimit.
func (s *Stream) Push(evs []task.Event) (have int, err error) {
	maxTokens, maxBytes, maxTotal := s.bounds()
	if h := s.hub; h != nil {
		var need int64
		for _, ev := range evs {
			need += eventCost(ev)
		}
		// Before s.mu: the hub locks streams under h.mu. An ended stream
		// takes nothing, so it sweeps nothing (a hub over its bound ends
		// each stream that pushes once).
		if h.bytes.Load()+need > maxTotal && !s.Ended() {
			h.reclaim(need)
		}
	}
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
		cost := eventCost(ev)
		next := s.base + len(s.tokens)
		takes := ev.Type == "metrics" || ev.Type == "started" && s.started == nil || ev.Type == "token" && ev.I == next
		over := ""
		switch {
		case !takes:
		case ev.Type == "token" && ev.I >= s.base+maxTokens:
			over = fmt.Sprintf("it reached %d tokens, the most one stream holds", maxTokens)
		case s.bytes+cost > maxBytes:
			over = fmt.Sprintf("it reached %d bytes, the most one stream holds", maxBytes)
		case s.held && s.hub.bytes.Load()+cost > maxTotal:
			over = fmt.Sprintf("the hub holds %d bytes of streams, its bound", s.hub.bytes.Load())
		}
		if over != "" {
			if s.hub != nil {
				s.hub.limited.Add(1)
			}
			s.finishLocked(limitEvent(s.id, over))
			changed = false // finishLocked notified
			return s.base + len(s.tokens), nil
		}
		switch ev.Type {
		case "started":
			if s.started == nil {
				e := ev
				s.started, changed = &e, true
				s.take(cost)
			}
		case "token":
			switch {
			case ev.I < next:
				continue
			case ev.I > next:
				return next, ErrGap
			}
			s.tokens, changed = append(s.tokens, piece{t: ev.T, tok: ev.Tok, lp: ev.LP}), true
			s.take(cost)
		case "metrics":
			s.metrics, changed = append(s.metrics, ev), true
			s.take(cost)
		case "end", "error":
			e := ev
			s.final, s.finished, changed = &e, time.Now(), true
			s.take(cost)
		}
	}
	return s.base + len(s.tokens), nil
}

// Finish ends the stream with ev unless it has ended; it reports whether ev
// was taken.
func (s *Stream) Finish(ev task.Event) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.finishLocked(ev)
}

func (s *Stream) finishLocked(ev task.Event) bool {
	if s.final != nil {
		return false
	}
	s.final, s.finished = &ev, time.Now()
	s.take(eventCost(ev))
	s.notify()
	return true
}

// Attach counts a reader of the stream until detach: an unfinished stream
// with a reader is never dropped, however quiet.
func (s *Stream) Attach() (detach func()) {
	s.mu.Lock()
	s.readers++
	s.active = time.Now()
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.readers--
			s.active = time.Now()
			s.mu.Unlock()
		})
	}
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
// from the base (those below are not held here). A read counts as
// activity: a reader that reads again (a keep-alive) keeps the stream.
func (s *Stream) Read(c Cursor) ([]task.Event, Cursor, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active = time.Now()
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
		p := s.tokens[c.Next-s.base]
		out = append(out, task.Event{Type: "token", I: c.Next, T: p.t, Tok: p.tok, LP: p.lp})
	}
	if !c.Done && s.final != nil {
		out = append(out, *s.final)
		c.Done = true
	}
	if s.changed == nil {
		s.changed = make(chan struct{})
	}
	return out, c, s.changed
}

// Done is closed once the stream has its final event: a reader that holds
// back between reads (the node link coalescing a burst of tokens) wakes
// for the end at once.
func (s *Stream) Done() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		s.done = make(chan struct{})
		if s.final != nil {
			close(s.done)
		}
	}
	return s.done
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
	for i, pc := range s.tokens {
		p.Tokens[i], p.Pieces[i] = pc.tok, pc.t
	}
	return p
}

// Peek returns the task's stream if the hub holds one.
func (h *Hub) Peek(taskID string) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.streams[taskID]
}
