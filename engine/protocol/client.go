package protocol

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// Client calls one engine.
type Client struct {
	URL  string       // http://host:port, no trailing slash
	HTTP *http.Client // nil: http.DefaultClient
}

func (c Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

// StatusError is an answer other than 200; Body is its start.
type StatusError struct {
	URL  string
	Code int
	Body []byte
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%s answered %d: %s", e.URL, e.Code, strings.TrimSpace(string(e.Body)))
}

// EventError is a /completion stream event that is not JSON.
type EventError struct{ Err error }

func (e *EventError) Error() string { return "bad stream event: " + e.Err.Error() }
func (e *EventError) Unwrap() error { return e.Err }

// Health is the status GET /health answers: 200 once the model is loaded,
// 503 while it loads.
func (c Client) Health(ctx context.Context) (int, error) {
	code, _, err := c.get(ctx, "/health")
	return code, err
}

// Props is GET /props.
func (c Client) Props(ctx context.Context) (Props, error) {
	var p Props
	return p, c.getJSON(ctx, "/props", &p)
}

// Slots is GET /slots.
func (c Client) Slots(ctx context.Context) ([]Slot, error) {
	var s []Slot
	return s, c.getJSON(ctx, "/slots", &s)
}

// Tokenize is POST /tokenize: the token ids of content.
func (c Client) Tokenize(ctx context.Context, req TokenizeRequest) ([]int32, error) {
	var out TokenizeResponse
	return out.Tokens, c.call(ctx, "/tokenize", req, &out)
}

// ApplyTemplate is POST /apply-template: the prompt the engine's chat
// template makes of the messages.
func (c Client) ApplyTemplate(ctx context.Context, messages []Message) (string, error) {
	var out ApplyTemplateResponse
	return out.Prompt, c.call(ctx, "/apply-template", ApplyTemplateRequest{Messages: messages}, &out)
}

// Complete starts a streaming POST /completion. The caller reads the
// events with Next and closes the stream. An answer other than 200 is a
// *StatusError holding the first 4 KiB of the body.
func (c Client) Complete(ctx context.Context, req CompletionRequest) (*Stream, error) {
	resp, err := c.post(ctx, "/completion", req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, &StatusError{URL: c.URL + "/completion", Code: resp.StatusCode, Body: b}
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	return &Stream{body: resp.Body, sc: sc}, nil
}

// Stream is the event stream of a /completion.
type Stream struct {
	body io.Closer
	sc   *bufio.Scanner
}

// Next is the next event; io.EOF once the stream ended, an *EventError for
// an event that is not JSON.
func (s *Stream) Next() (Chunk, error) {
	for s.sc.Scan() {
		line := s.sc.Bytes()
		if !bytes.HasPrefix(line, []byte("data: ")) {
			continue
		}
		var ch Chunk
		if err := json.Unmarshal(line[6:], &ch); err != nil {
			return Chunk{}, &EventError{Err: err}
		}
		return ch, nil
	}
	if err := s.sc.Err(); err != nil {
		return Chunk{}, err
	}
	return Chunk{}, io.EOF
}

// Close ends the stream; the engine sees its client go.
func (s *Stream) Close() error { return s.body.Close() }

// get reads up to 1 MiB of the answer to GET path.
func (c Client) get(ctx context.Context, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.URL+path, nil)
	if err != nil {
		return 0, nil, err
	}
	res, err := c.http().Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	return res.StatusCode, b, err
}

func (c Client) getJSON(ctx context.Context, path string, out any) error {
	code, b, err := c.get(ctx, path)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("status %d", code)
	}
	return json.Unmarshal(b, out)
}

func (c Client) post(ctx context.Context, path string, body any) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return c.http().Do(req)
}

// call posts body and decodes the 200 answer (up to 16 MiB) into out.
func (c Client) call(ctx context.Context, path string, body, out any) error {
	resp, err := c.post(ctx, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		return &StatusError{URL: c.URL + path, Code: resp.StatusCode, Body: b}
	}
	return json.Unmarshal(b, out)
}
