package apiserver

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

var sseTexts = func() []string {
	s := []string{"", " tok", "héllo", "日本語", "🦙", `"`, `\`, "\n", "\t\r\b\f", "\x00\x1f\x7f", "<b>&amp;</b>",
		"\u2028\u2029", "bad \xff utf8", "\xe2\x80", "trail\xc3", "\xed\xa0\x80", "\U0010FFFF", chunkMarker[1:], "data: x\n\n"}
	for c := rune(0); c < 0x800; c += 7 {
		s = append(s, string(c), "a"+string(c)+"\xff")
	}
	return s
}()

// sseV2Marshal is sseV2 as it was: json.Marshal of a map per token.
func sseV2Marshal(ev task.Event) []byte {
	b, _ := json.Marshal(map[string]any{"t": ev.T, "i": ev.I})
	var sb strings.Builder
	sb.WriteString("id: " + strconv.Itoa(ev.I) + "\n")
	sb.WriteString("event: " + ev.Type + "\ndata: ")
	sb.Write(b)
	sb.WriteString("\n\n")
	return []byte(sb.String())
}

// openAIChunk is openAIComplete's chunk, as each token was marshaled.
func openAIChunk(chat bool, id, object, model string, created int64) func(text string) any {
	return func(text string) any {
		ch := fiber.Map{"index": 0, "finish_reason": nil, "logprobs": nil}
		if chat {
			ch["delta"] = fiber.Map{"content": text}
		} else {
			ch["text"] = text
		}
		return fiber.Map{"id": id, "object": object, "created": created, "model": model, "choices": []any{ch}}
	}
}

// The renderers that append bytes write what json.Marshal wrote.
func TestSSERenderersAsMarshal(t *testing.T) {
	for i, text := range sseTexts {
		ev := task.Event{Type: "token", I: i * 977, T: text, Tok: 5}
		require.Equal(t, string(sseV2Marshal(ev)), string(sseV2(ev)), "%q", text)
	}
	for _, chat := range []bool{true, false} {
		for _, names := range [][2]string{{"chatcmpl-t1", "tiny"}, {"cmpl-<&>", "m\u2028\"x\""}, {"cmpl-" + chunkMarker, chunkMarker}} {
			chunk := openAIChunk(chat, names[0], "chat.completion.chunk", names[1], 1796500000)
			tokens := newTokenChunks(chunk)
			require.Equal(t, names[1] != chunkMarker, tokens.head != nil, "the template is cut unless the marker is in it twice")
			for _, text := range sseTexts {
				require.Equal(t, string(sseData(chunk(text))), string(tokens.render(text)), "chat=%v %q", chat, text)
			}
		}
	}
}

func BenchmarkSSETokens(b *testing.B) {
	ev := task.Event{Type: "token", I: 123, T: " token", Tok: 7}
	chunk := openAIChunk(true, "chatcmpl-t1", "chat.completion.chunk", "tiny", 1796500000)
	for _, r := range []struct {
		name   string
		render func() []byte
	}{
		{"v2/marshal", func() []byte { return sseV2Marshal(ev) }},
		{"v2/append", func() []byte { return sseV2(ev) }},
		{"v1/marshal", func() []byte { return sseData(chunk(ev.T)) }},
		{"v1/append", func() func() []byte { c := newTokenChunks(chunk); return func() []byte { return c.render(ev.T) } }()},
	} {
		b.Run(r.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = r.render()
			}
		})
	}
}
