package testenv

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Event is one server-sent event of a task's /v2 stream.
type Event struct {
	ID, Name string
	Data     map[string]any
}

// Follow reads the /v2 stream of a task from the apiserver at addr
// (host:port), from after lastID when set. It delivers each event on the
// channel and closes it at the end of the stream; stop hangs up.
func Follow(t testing.TB, addr, token, taskID, lastID string) (events <-chan Event, stop func()) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+"/v2/tasks/"+taskID+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, 200, res.StatusCode)
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	out := make(chan Event, 1024)
	go func() {
		defer close(out)
		ReadEvents(res.Body, func(ev Event) bool { out <- ev; return true })
	}()
	var once sync.Once
	return out, func() { once.Do(func() { res.Body.Close() }) }
}

// ReadEvents parses an SSE body, handing each event to each until each
// returns false or the body ends.
func ReadEvents(r io.Reader, each func(Event) bool) {
	sc := bufio.NewScanner(r)
	var ev Event
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if ev.Name != "" && !each(ev) {
				return
			}
			ev = Event{}
		case strings.HasPrefix(line, "id: "):
			ev.ID = line[4:]
		case strings.HasPrefix(line, "event: "):
			ev.Name = line[7:]
		case strings.HasPrefix(line, "data: "):
			_ = json.Unmarshal([]byte(line[6:]), &ev.Data)
		}
	}
}

// Collect reads a stream to its end: the events, and the text of its tokens.
func Collect(t testing.TB, ch <-chan Event, timeout time.Duration) ([]Event, string) {
	t.Helper()
	var evs []Event
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return evs, Text(evs)
			}
			evs = append(evs, ev)
		case <-deadline:
			t.Fatalf("stream not done within %s; got %d events", timeout, len(evs))
		}
	}
}

// Text joins the texts of the token events.
func Text(evs []Event) string {
	var text strings.Builder
	for _, ev := range evs {
		if ev.Name == "token" {
			text.WriteString(ev.Data["t"].(string))
		}
	}
	return text.String()
}

// CheckOrder asserts a stream's shape: started (when from is 0), then
// tokens from..n-1 in order with matching ids, then end with n. It returns n.
func CheckOrder(t testing.TB, evs []Event, from int) int {
	t.Helper()
	require.NotEmpty(t, evs)
	i := 0
	if from == 0 {
		require.Equal(t, "started", evs[0].Name, "first event: %v", evs[0].Data)
		i = 1
	}
	next := from
	for ; i < len(evs)-1; i++ {
		if evs[i].Name == "metrics" {
			continue
		}
		require.Equal(t, "token", evs[i].Name, "event %d", i)
		require.EqualValues(t, next, evs[i].Data["i"], "token index")
		require.Equal(t, strconv.Itoa(next), evs[i].ID)
		next++
	}
	last := evs[len(evs)-1]
	require.Equal(t, "end", last.Name, "%v", last.Data)
	require.EqualValues(t, next, last.Data["tokens_out"])
	return next
}

// Greedy asks an engine directly for n tokens at temperature 0: the
// reference text for strict tasks.
func Greedy(t testing.TB, url, prompt string, n int) string {
	t.Helper()
	// No slot cache: the whole prompt decoded, as a strict task does.
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": false})
	res, err := http.Post(url+"/completion", "application/json", strings.NewReader(string(body)))
	require.NoError(t, err)
	defer res.Body.Close()
	var out struct {
		Content string `json:"content"`
	}
	b, _ := io.ReadAll(res.Body)
	require.NoError(t, json.Unmarshal(b, &out), string(b))
	return out.Content
}

// UntilResumed reads a stream until the first token after the task moved
// to another pool (the metrics event that says where it resumed).
func UntilResumed(t testing.TB, ch <-chan Event, timeout time.Duration) []Event {
	t.Helper()
	var evs []Event
	moved := false
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-ch:
			require.True(t, ok, "stream ended before the task resumed elsewhere: %v", evs)
			evs = append(evs, ev)
			if ev.Name == "metrics" && ev.Data["resumed_at_token"] != nil {
				moved = true
			}
			if moved && ev.Name == "token" {
				return evs
			}
		case <-deadline:
			t.Fatalf("task not resumed within %s; got %d events", timeout, len(evs))
		}
	}
}
