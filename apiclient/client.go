package apiclient

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// Client talks to one apiserver.
type Client struct {
	base  string
	token string
	hc    *http.Client
}

// New returns a client of the apiserver at baseURL (http://host:port or
// https://host:port); token is its bearer token, "" for none.
func New(baseURL, token string) (*Client, error) {
	u, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%q: want http://host:port or https://host:port", baseURL)
	}
	return &Client{base: u.String(), token: token, hc: &http.Client{}}, nil
}

// SetTLS has the client verify the apiserver's certificate with cfg (its
// RootCAs: a private CA); nil keeps the system's roots.
func (c *Client) SetTLS(cfg *tls.Config) {
	if cfg == nil {
		return
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	c.hc = &http.Client{Transport: tr}
}

// Envelope is the body of every error response; the apiserver renders
// this type, so both sides read the same fields.
type Envelope struct {
	Code         string `json:"code"`
	Message      string `json:"message"`
	Field        string `json:"field,omitempty"`
	Retriable    bool   `json:"retriable,omitempty"`
	RetryAfterMs int64  `json:"retry_after_ms,omitempty"`
	PolicyLabel  string `json:"policy_label,omitempty"`
}

// Error is an answer other than 2xx: its HTTP status and the API's error
// envelope.
type Error struct {
	Status int `json:"-"`
	Envelope
}

func (e *Error) Error() string {
	msg := e.Code + ": " + e.Message
	if e.Field != "" && !strings.Contains(e.Message, e.Field) {
		msg += " (field " + e.Field + ")"
	}
	return msg
}

// UnreachableError is a request that got no answer from the apiserver.
type UnreachableError struct {
	BaseURL string
	Err     error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("cannot reach the llorch apiserver at %s: %v%s", e.BaseURL, e.Err, UntrustedHint(e.Err, "--api-ca or LLORCH_API_CA"))
}

// UntrustedHint says what to set (setting) when err is a server
// certificate this client's roots do not verify; "" for other errors.
func UntrustedHint(err error, setting string) string {
	var unknown x509.UnknownAuthorityError
	var verify *tls.CertificateVerificationError
	if errors.As(err, &unknown) || errors.As(err, &verify) {
		return " (the server's certificate is not signed by a CA this client trusts: set " + setting + " to the PEM of the CA that signed it)"
	}
	return ""
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// Call sends a request to path with body as JSON (nil: none) and returns
// the body of a 2xx answer; any other answer is an *Error (a body that is
// no envelope becomes one with the HTTP status as its code).
func (c *Client) Call(ctx context.Context, method, path string, body any) ([]byte, error) {
	resp, err := c.send(ctx, method, path, body, "application/json")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	u := c.base + path
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer: %w", method, u, err)
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return raw, nil
	}
	return raw, ErrorOf(method, u, resp.StatusCode, raw)
}

// send sends a request with the client's token, body as JSON (nil: none),
// accepting accept. No answer is an *UnreachableError, or ctx's cause.
func (c *Client) send(ctx context.Context, method, path string, body any, accept string) (*http.Response, error) {
	u := c.base + path
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", accept)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", method, u, context.Cause(ctx))
		}
		return nil, &UnreachableError{BaseURL: c.base, Err: err}
	}
	return resp, nil
}

// ErrorOf is the *Error of an answer other than 2xx to method url: its
// envelope, or for a body that is none, one with the HTTP status as its
// code and the body's start as its message.
func ErrorOf(method, url string, status int, body []byte) *Error {
	ae := &Error{Status: status}
	if json.Unmarshal(body, &ae.Envelope) != nil || ae.Code == "" {
		text := truncate(strings.TrimSpace(string(body)), 300)
		if text == "" {
			text = http.StatusText(status)
		}
		ae.Envelope = Envelope{Code: "HTTP_" + strconv.Itoa(status), Message: fmt.Sprintf("%s %s: %s", method, url, text)}
	}
	return ae
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Events reads the server-sent events at path (a task's stream), calling
// each with every event's name and data until the stream or ctx ends, or
// each returns an error (io.EOF: stop, no error).
func (c *Client) Events(ctx context.Context, path string, each func(event string, data []byte) error) error {
	resp, err := c.send(ctx, http.MethodGet, path, nil, "text/event-stream")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	u := c.base + path
	if resp.StatusCode != http.StatusOK {
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return ErrorOf(http.MethodGet, u, resp.StatusCode, raw)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	event := "message"
	var data []byte
	for sc.Scan() {
		line := sc.Bytes()
		switch {
		case len(line) == 0:
			if data != nil {
				if err := each(event, data); err != nil {
					if err == io.EOF {
						return nil
					}
					return err
				}
			}
			event, data = "message", nil
		case bytes.HasPrefix(line, []byte("event:")):
			event = string(bytes.TrimSpace(line[len("event:"):]))
		case bytes.HasPrefix(line, []byte("data:")):
			data = append(data, bytes.TrimPrefix(line[len("data:"):], []byte(" "))...)
		}
	}
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}
