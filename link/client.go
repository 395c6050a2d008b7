package link

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
)

// Client reads one node's link.
type Client struct {
	// URL is the link's base, as node.Inventory.LinkURL publishes it.
	URL   string
	Token string
	// HTTP sends the requests; nil: http.DefaultClient. Each request is
	// bounded by its own context (a long-poll's by its wait), so a client
	// timeout shorter than node.LinkMaxWait would cut long-polls.
	HTTP *http.Client
	// Wait bounds Watch's long-polls; 0: node.LinkDefaultWait.
	Wait time.Duration
}

// answerMargin is how long past its wait a long-poll may take to answer
// before the client gives up on it; a plain read gets as long.
const answerMargin = 10 * time.Second

// State reads the node's current state.
func (c *Client) State(ctx context.Context) (node.LinkState, error) {
	return c.get(ctx, "", answerMargin)
}

// Watch long-polls: it returns once the node's version differs from after,
// or at the wait bound with the current state (same version).
func (c *Client) Watch(ctx context.Context, after uint64) (node.LinkState, error) {
	wait := c.Wait
	if wait <= 0 {
		wait = node.LinkDefaultWait
	}
	query := "?" + node.LinkAfterParam + "=" + strconv.FormatUint(after, 10) + "&" + node.LinkWaitParam + "=" + wait.String()
	return c.get(ctx, query, wait+answerMargin)
}

// get reads the state with query ("" or "?..."), within bound.
func (c *Client) get(ctx context.Context, query string, bound time.Duration) (node.LinkState, error) {
	var st node.LinkState
	u := strings.TrimRight(c.URL, "/") + node.LinkStatePath + query
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return st, fmt.Errorf("node link %s: %w", c.URL, err)
	}
	req.Header.Set("Accept", "application/json")
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	res, err := hc.Do(req)
	if err != nil {
		return st, fmt.Errorf("node link %s: %w%s", c.URL, err, untrusted(err))
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if err != nil {
		return st, fmt.Errorf("node link %s: reading the answer: %w", c.URL, err)
	}
	if res.StatusCode != http.StatusOK {
		return st, apiclient.ErrorOf(http.MethodGet, u, res.StatusCode, raw)
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return st, fmt.Errorf("node link %s: not a node state: %w", c.URL, err)
	}
	return st, nil
}

// silentLimit is how long an event stream may stay silent (no event, no
// keep-alive) before the client takes the node for gone.
const silentLimit = 3 * node.LinkKeepAlive

// ErrStreamCut says an event stream ended before its final event.
var ErrStreamCut = errors.New("task stream ended before its final event")

// Events subscribes to the task's events after token index after (-1: from
// the start) and hands each to each, in order, until the final event (nil
// error), a failure of each (its error), or a broken or silent stream. A
// node that does not hold the task answers, after its wait, an
// *apiclient.Error with code node.CodeTaskNotOnNode.
func (c *Client) Events(ctx context.Context, taskID string, after int, each func(task.Event) error) error {
	return c.EventBatches(ctx, taskID, after, func(evs []task.Event) error {
		for _, ev := range evs {
			if err := each(ev); err != nil {
				return err
			}
		}
		return nil
	})
}

// EventBatches is Events handing over the events that arrived together
// (the lines one read of the stream brought) in one call, so a follower
// takes a burst of tokens in one push. each must not keep evs: the
// slice is reused for the next batch.
func (c *Client) EventBatches(ctx context.Context, taskID string, after int, each func([]task.Event) error) error {
	u := strings.TrimRight(c.URL, "/") + node.LinkTaskEventsPath(taskID) + "?" + node.LinkEventsAfterParam + "=" + strconv.Itoa(after)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("node link %s: %w", c.URL, err)
	}
	req.Header.Set("Accept", "application/x-ndjson")
	c.auth(req)
	// Silence past silentLimit cancels the request: a node that went away
	// without closing the connection is noticed.
	silent := time.AfterFunc(node.LinkDefaultWait+answerMargin, cancel)
	defer silent.Stop()
	res, err := c.http().Do(req)
	if err != nil {
		return fmt.Errorf("node link %s: task %s events: %w%s", c.URL, taskID, err, untrusted(err))
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		raw, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		return apiclient.ErrorOf(http.MethodGet, u, res.StatusCode, raw)
	}
	lines := newLineReader(res.Body)
	var batch []task.Event
	for {
		silent.Reset(silentLimit)
		batch = batch[:0]
		final := false
		// The lines already received go in one batch; the batch ends
		// when the next would wait for the network, or at the final
		// event.
		for !final && (len(batch) == 0 || lines.ready()) {
			line, err := lines.next()
			if err != nil {
				if len(batch) > 0 {
					if err := each(batch); err != nil {
						return err
					}
				}
				if err == io.EOF {
					return fmt.Errorf("node link %s: task %s: %w", c.URL, taskID, ErrStreamCut)
				}
				return fmt.Errorf("node link %s: task %s events: %w", c.URL, taskID, err)
			}
			line = bytes.TrimSpace(line)
			if len(line) == 0 || string(line) == "{}" {
				if len(batch) == 0 {
					silent.Reset(silentLimit) // keep-alive
				}
				continue
			}
			ev, ok := parseTokenLine(line)
			if !ok {
				ev = task.Event{}
				if err := json.Unmarshal(line, &ev); err != nil {
					return fmt.Errorf("node link %s: task %s: not an event: %w", c.URL, taskID, err)
				}
			}
			batch = append(batch, ev)
			final = ev.Type == "end" || ev.Type == "error"
		}
		if err := each(batch); err != nil {
			return err
		}
		if final {
			return nil
		}
	}
}

// maxLine bounds one event's line.
const maxLine = 16 << 20

// lineReader reads NDJSON lines and says whether a whole line is already
// received.
type lineReader struct {
	r    *bufio.Reader
	long []byte // a line longer than r's buffer
}

func newLineReader(r io.Reader) *lineReader { return &lineReader{r: bufio.NewReaderSize(r, 64<<10)} }

// next returns the next line, valid until the next call.
func (l *lineReader) next() ([]byte, error) {
	line, err := l.r.ReadSlice('\n')
	if err != bufio.ErrBufferFull {
		if err == io.EOF && len(line) > 0 {
			return line, nil // a last line without its newline
		}
		return line, err
	}
	l.long = append(l.long[:0], line...)
	for err == bufio.ErrBufferFull {
		if line, err = l.r.ReadSlice('\n'); len(l.long)+len(line) > maxLine {
			return nil, fmt.Errorf("an event line longer than %d bytes", maxLine)
		}
		l.long = append(l.long, line...)
	}
	if err == io.EOF && len(l.long) > 0 {
		err = nil
	}
	return l.long, err
}

// ready says whether a whole line is received: reading it does not wait.
func (l *lineReader) ready() bool {
	b, _ := l.r.Peek(l.r.Buffered())
	return bytes.IndexByte(b, '\n') >= 0
}

// parseTokenLine reads a token event's line as the link writes it
// (appendTokenLine) without encoding/json for the event, the cost of
// nearly every line; ok is false for any other line, which json.Unmarshal
// reads. What it reads is what json.Unmarshal reads from the same line.
func parseTokenLine(line []byte) (ev task.Event, ok bool) {
	rest, ok := bytes.CutPrefix(line, []byte(tokenLinePrefix))
	if !ok {
		return ev, false
	}
	i, rest, ok := cutInt(rest, 64)
	if !ok {
		return ev, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(`,"t":`)); !ok || len(rest) == 0 || rest[0] != '"' {
		return ev, false
	}
	// The string ends at the first quote no backslash escapes.
	end, backslash, wide := 1, false, false
	for ; end < len(rest) && rest[end] != '"'; end++ {
		switch b := rest[end]; {
		case b == '\\':
			backslash = true
			end++
		case b < 0x20:
			return ev, false // not JSON: json.Unmarshal says so
		case b >= utf8.RuneSelf:
			wide = true
		}
	}
	if end >= len(rest) {
		return ev, false
	}
	quoted := rest[:end+1]
	if rest, ok = bytes.CutPrefix(rest[end+1:], []byte(`,"tok":`)); !ok {
		return ev, false
	}
	tok, rest, ok := cutInt(rest, 32)
	if !ok || string(rest) != "}" {
		return ev, false
	}
	ev = task.Event{Type: "token", I: int(i), Tok: int32(tok)}
	raw := quoted[1 : len(quoted)-1]
	if !backslash && (!wide || utf8.Valid(raw)) {
		ev.T = string(raw)
	} else if json.Unmarshal(quoted, &ev.T) != nil {
		return task.Event{}, false
	}
	return ev, true
}

// cutInt reads a JSON integer that fits in bits from the start of b (at
// most 18 digits; longer ones are left to json.Unmarshal).
func cutInt(b []byte, bits int) (n int64, rest []byte, ok bool) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	d := 0
	for d < len(b) && d <= 18 && b[d] >= '0' && b[d] <= '9' {
		n = n*10 + int64(b[d]-'0')
		d++
	}
	if d == 0 || d > 18 || d > 1 && b[0] == '0' || d < len(b) && b[d] >= '0' && b[d] <= '9' {
		return 0, nil, false
	}
	if neg {
		n = -n
	}
	if n < -(1<<(bits-1)) || n > 1<<(bits-1)-1 {
		return 0, nil, false
	}
	return n, b[d:], true
}

// Cancel ends the task's node stream with CANCELED (reason says why).
func (c *Client) Cancel(ctx context.Context, taskID, reason string) error {
	u := strings.TrimRight(c.URL, "/") + node.LinkTaskCancelPath(taskID)
	ctx, cancel := context.WithTimeout(ctx, answerMargin)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader(reason))
	if err != nil {
		return fmt.Errorf("node link %s: %w", c.URL, err)
	}
	req.Header.Set("Content-Type", "text/plain; charset=utf-8")
	c.auth(req)
	res, err := c.http().Do(req)
	if err != nil {
		return fmt.Errorf("node link %s: cancel task %s: %w%s", c.URL, taskID, err, untrusted(err))
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if res.StatusCode != http.StatusNoContent {
		return apiclient.ErrorOf(http.MethodPost, u, res.StatusCode, raw)
	}
	return nil
}

// untrusted says how to trust a link's private CA when err is a certificate
// the client could not verify.
func untrusted(err error) string { return apiclient.UntrustedHint(err, "--link-ca or LLORCH_LINK_CA") }

func (c *Client) auth(req *http.Request) {
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
}

func (c *Client) http() *http.Client {
	if c.HTTP == nil {
		return DefaultHTTP
	}
	return c.HTTP
}

// DefaultHTTP reaches node links when a Client names no other: a node
// that went silent is noticed in seconds, not at the OS's defaults. The
// connection attempt is bounded (a partitioned node drops the SYN), TCP
// keep-alive probes every second after 2 s idle find a silent peer in
// about 5 s, and idle connections are kept for every node (a long-poll's
// connection is idle between two answers), not the default's 100 in all.
// A node keeps up to 64 idle: a burst of fast starts to one node (50 at
// once in the first-token benchmark) reuses its connections instead of
// dialling one per request, which put 10-40 ms of loopback connects and
// accepts before the node heard of each generation.
var DefaultHTTP = &http.Client{Transport: &http.Transport{
	Proxy: http.ProxyFromEnvironment,
	DialContext: (&net.Dialer{Timeout: 3 * time.Second,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 2 * time.Second, Interval: time.Second, Count: 3}}).DialContext,
	MaxIdleConnsPerHost: 64,
	IdleConnTimeout:     90 * time.Second,
}}
