package link

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/node"
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
		return st, fmt.Errorf("node link %s: %w", c.URL, err)
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
