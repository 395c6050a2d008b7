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
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for {
		silent.Reset(silentLimit)
		if !sc.Scan() {
			break
		}
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || string(line) == "{}" {
			continue // keep-alive
		}
		var ev task.Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return fmt.Errorf("node link %s: task %s: not an event: %w", c.URL, taskID, err)
		}
		if err := each(ev); err != nil {
			return err
		}
		if ev.Type == "end" || ev.Type == "error" {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("node link %s: task %s events: %w", c.URL, taskID, err)
	}
	return fmt.Errorf("node link %s: task %s: %w", c.URL, taskID, ErrStreamCut)
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
var DefaultHTTP = &http.Client{Transport: &http.Transport{
	Proxy: http.ProxyFromEnvironment,
	DialContext: (&net.Dialer{Timeout: 3 * time.Second,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 2 * time.Second, Interval: time.Second, Count: 3}}).DialContext,
	MaxIdleConnsPerHost: 4,
	IdleConnTimeout:     90 * time.Second,
}}
