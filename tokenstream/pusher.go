package tokenstream

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/llorch/llorch/task"
)

// PushPath is the apiserver route a node pushes a task's events to.
func PushPath(taskID string) string { return "/internal/v1/streams/" + taskID }

// PushBody is a batch of events.
type PushBody struct {
	Events []task.Event `json:"events"`
}

// PushReply says how many tokens the hub holds.
type PushReply struct {
	Have int `json:"have"`
}

// Pusher sends a task's events to its sink in batches: whatever queued up
// while the previous request was in flight goes in the next one, so a slow
// link batches more and a fast one sends each token at once. Failed sends
// are retried, backing off; a hub that lost its state (an apiserver
// restart) gets everything again from the start. The pusher gives up after
// pushGiveUp without a success, and stops for good when Close returns.
type Pusher struct {
	sink   task.Sink
	taskID string
	client *http.Client
	ctx    context.Context // ends when Close returns: the loop stops
	stop   context.CancelFunc

	mu      sync.Mutex
	events  []task.Event // everything, in order
	sent    int          // events[:sent] are acknowledged
	wake    chan struct{}
	closed  bool
	gaveUp  bool
	done    chan struct{}
	lastErr error
}

// pushGiveUp is how long a pusher retries without a success before it
// gives up on the sink (an apiserver gone for good); a var for tests.
var pushGiveUp = 3 * time.Minute

// NewPusher starts pushing to sink until Close.
func NewPusher(sink task.Sink, taskID string, client *http.Client) *Pusher {
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	p := &Pusher{sink: sink, taskID: taskID, client: client, wake: make(chan struct{}, 1), done: make(chan struct{})}
	p.ctx, p.stop = context.WithCancel(context.Background())
	go p.loop()
	return p
}

// Send queues events; after Close, or once the pusher gave up, it drops
// them (nothing would send them).
func (p *Pusher) Send(evs ...task.Event) {
	p.mu.Lock()
	if p.closed || p.gaveUp {
		p.mu.Unlock()
		return
	}
	p.events = append(p.events, evs...)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Close flushes what is queued, waiting at most wait, and stops: when it
// returns, nothing retries any more. It returns the last send error if
// events were left unsent.
func (p *Pusher) Close(wait time.Duration) error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
	}
	p.stop() // ends a post in flight and the backoff
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sent < len(p.events) {
		return fmt.Errorf("%d events unsent: %v", len(p.events)-p.sent, p.lastErr)
	}
	return nil
}

func (p *Pusher) loop() {
	defer close(p.done)
	backoff := 20 * time.Millisecond
	var lastPost time.Time
	lastOK := time.Now()
	for p.ctx.Err() == nil {
		// Right after a post, give a small batch a moment to grow: it
		// bounds requests to one per minGap under a fast stream, while the
		// first event of a quiet stream still goes at once.
		if wait := minGap - time.Since(lastPost); wait > 0 && p.pending() < batchEnough {
			time.Sleep(wait)
		}
		p.mu.Lock()
		batch := append([]task.Event(nil), p.events[p.sent:]...)
		closed := p.closed
		p.mu.Unlock()
		if len(batch) == 0 {
			if closed {
				return
			}
			select {
			case <-p.wake:
			case <-p.ctx.Done():
			}
			continue
		}
		lastPost = time.Now()
		restart, err := p.post(batch)
		p.mu.Lock()
		switch {
		case err != nil:
			p.lastErr = err
		case restart:
			p.sent = 0 // the hub lost its state: send everything again
		default:
			p.sent += len(batch)
		}
		p.mu.Unlock()
		if err == nil {
			backoff, lastOK = 20*time.Millisecond, time.Now()
			continue
		}
		if time.Since(lastOK) > pushGiveUp && p.ctx.Err() == nil {
			p.mu.Lock()
			p.gaveUp = true
			unsent := len(p.events) - p.sent
			p.mu.Unlock()
			slog.Warn("token pusher: giving up on the task's sink", "task_id", p.taskID, "sink", p.sink.URL,
				"unsent", unsent, "failing_for", time.Since(lastOK).Round(time.Second).String(), "err", err)
			return
		}
		select {
		case <-time.After(backoff):
		case <-p.wake:
		case <-p.ctx.Done():
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// Batching: at most one request per minGap unless batchEnough events wait.
const (
	minGap      = 2 * time.Millisecond
	batchEnough = 32
)

func (p *Pusher) pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.events) - p.sent
}

func (p *Pusher) post(batch []task.Event) (restart bool, err error) {
	body, err := json.Marshal(PushBody{Events: batch})
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.sink.URL+PushPath(p.taskID), bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	if p.sink.Token != "" {
		req.Header.Set("Authorization", "Bearer "+p.sink.Token)
	}
	res, err := p.client.Do(req)
	if err != nil {
		return false, err
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	switch res.StatusCode {
	case http.StatusOK:
		return false, nil
	case http.StatusConflict: // a gap: the hub has fewer tokens than we think
		return true, nil
	}
	return false, fmt.Errorf("push to %s: HTTP %d: %s", p.sink.URL, res.StatusCode, b)
}
