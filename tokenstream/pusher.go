package tokenstream

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
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
// are retried; a hub that lost its state (an apiserver restart) gets
// everything again from the start.
type Pusher struct {
	sink   task.Sink
	taskID string
	client *http.Client

	mu      sync.Mutex
	events  []task.Event // everything, in order
	sent    int          // events[:sent] are acknowledged
	wake    chan struct{}
	closed  bool
	done    chan struct{}
	lastErr error
}

// NewPusher starts pushing to sink until Close.
func NewPusher(sink task.Sink, taskID string, client *http.Client) *Pusher {
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	p := &Pusher{sink: sink, taskID: taskID, client: client, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go p.loop()
	return p
}

// Send queues events.
func (p *Pusher) Send(evs ...task.Event) {
	p.mu.Lock()
	p.events = append(p.events, evs...)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Close flushes what is queued, waiting at most wait, and stops. It returns
// the last send error if events were left unsent.
func (p *Pusher) Close(wait time.Duration) error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	select {
	case <-p.done:
	case <-time.After(wait):
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sent < len(p.events) {
		p.closed = true
		return fmt.Errorf("%d events unsent: %v", len(p.events)-p.sent, p.lastErr)
	}
	return nil
}

func (p *Pusher) loop() {
	defer close(p.done)
	backoff := 20 * time.Millisecond
	var lastPost time.Time
	for {
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
			<-p.wake
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
			backoff = 20 * time.Millisecond
			continue
		}
		select {
		case <-time.After(backoff):
		case <-p.wake:
		}
		backoff = min(2*backoff, time.Second)
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
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
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
