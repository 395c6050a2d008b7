package apiserver

import (
	"bytes"
	"encoding/json"
	"strconv"

	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// The SSE renderers of the task streams. Token events, nearly all of a
// stream, are rendered by appending bytes rather than marshaling a map
// per token; the output is byte for byte what json.Marshal gave
// (sse_test.go holds them to it).

// sseV2 renders an event of the /v2 stream; nil for a type it does not
// carry.
func sseV2(ev task.Event) []byte {
	var data any
	switch ev.Type {
	case "started":
		data = map[string]any{"node_id": ev.NodeID, "pool_id": ev.PoolID}
	case "token":
		return appendSSEToken(make([]byte, 0, 48+len(ev.T)), ev)
	case "metrics":
		data = ev.Metrics
	case "end":
		data = map[string]any{"tokens_out": ev.TokensOut, "decode_time_ms": ev.DecodeTimeMs, "tokens_in": ev.TokensIn, "tokens_cached": ev.TokensCached, "stop_type": ev.StopType}
	case "error":
		data = ev.Error
	default:
		return nil
	}
	b, _ := json.Marshal(data)
	out := make([]byte, 0, len(ev.Type)+len(b)+16)
	out = append(append(append(out, "event: "...), ev.Type...), "\ndata: "...)
	return append(append(out, b...), "\n\n"...)
}

// appendSSEToken appends a token event as /v2 carries it: its index as
// the event id (a client resumes with Last-Event-ID), and {"i","t"} in
// json.Marshal's key order.
func appendSSEToken(dst []byte, ev task.Event) []byte {
	dst = append(dst, "id: "...)
	dst = strconv.AppendInt(dst, int64(ev.I), 10)
	dst = append(dst, "\nevent: token\ndata: {\"i\":"...)
	dst = strconv.AppendInt(dst, int64(ev.I), 10)
	dst = append(dst, `,"t":`...)
	dst = tokenstream.AppendJSONString(dst, ev.T)
	return append(dst, "}\n\n"...)
}

// sseData renders v as an SSE data line (the /v1 streams).
func sseData(v any) []byte {
	b, _ := json.Marshal(v)
	return append(append([]byte("data: "), b...), "\n\n"...)
}

// chunkMarker stands for a token's text in the chunk a /v1 stream renders
// its token chunks from: it cannot occur in an id or a model id.
const chunkMarker = "\x00llorch-token\x00"

// tokenChunks renders a /v1 stream's token chunks. Every token chunk of a
// stream is the same JSON but for the text: it is marshaled once, around
// chunkMarker, and each token's text is spliced in.
type tokenChunks struct {
	head, tail []byte
	slow       func(text string) any // the chunk, marshaled per token where no template could be cut
}

// newTokenChunks takes the stream's chunk for a token's text.
func newTokenChunks(chunk func(text string) any) tokenChunks {
	c := tokenChunks{slow: chunk}
	b := sseData(chunk(chunkMarker))
	m, _ := json.Marshal(chunkMarker)
	if head, tail, ok := bytes.Cut(b, m); ok && !bytes.Contains(tail, m) {
		c.head, c.tail = head, tail
	}
	return c
}

// render is the chunk of a token with text.
func (c tokenChunks) render(text string) []byte {
	if c.head == nil {
		return sseData(c.slow(text))
	}
	out := make([]byte, 0, len(c.head)+len(c.tail)+len(text)+8)
	out = append(out, c.head...)
	out = tokenstream.AppendJSONString(out, text)
	return append(out, c.tail...)
}
