package link

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

var oddTexts = []string{
	"", " tok", "héllo", "日本語", "🦙", `"`, `\`, `\"`, "\\n", "\n", "\t\r\b\f", "\x00\x1f\x7f", "<a href=\"x\">&amp;</a>",
	"\u2028\u2029", "bad \xff utf8", "\xe2\x80", "trail\xc3", "\xed\xa0\x80", "\U0010FFFF", `","tok":7}`, "}\n{",
}

// The link writes token events as json.Encoder does, so older replicas
// read them with encoding/json; every other event goes through it.
func TestTokenLinesAsEncoderWrites(t *testing.T) {
	var evs []task.Event
	for i, s := range oddTexts {
		evs = append(evs, task.Event{Type: "token", I: i, T: s, Tok: int32(i*1000 - 3)})
	}
	evs = append(evs, task.Event{Type: "token", I: 1 << 40, T: "x", Tok: -1 << 31},
		task.Event{Type: "started", NodeID: "n1", PoolID: "p<1>"},
		task.Event{Type: "token", I: 3, T: "x", NodeID: "odd"}, // not a plain token: marshaled
		task.Event{Type: "metrics", Metrics: map[string]any{"queue_position": 2, "w": "<&>"}},
		task.Event{Type: "end", TokensOut: 4, StopType: "eos"},
		task.Event{Type: "error", Error: &task.Error{Code: task.ErrCanceled, Message: "by \"test\" \u2028"}})
	var want bytes.Buffer
	enc := json.NewEncoder(&want)
	for _, ev := range evs {
		require.NoError(t, enc.Encode(ev))
	}
	got, tokens, err := appendEvents(nil, evs)
	require.NoError(t, err)
	require.True(t, tokens)
	require.Equal(t, want.String(), string(got))

	// Each line reads back as json.Unmarshal reads it.
	for line := range bytes.Lines(got) {
		var want task.Event
		require.NoError(t, json.Unmarshal(line, &want))
		ev, ok := parseTokenLine(bytes.TrimSpace(line))
		if ok {
			require.Equal(t, want, ev, "%s", line)
		} else {
			require.False(t, want.Type == "token" && want.NodeID == "", "a plain token line the fast path missed: %s", line)
		}
	}
}

// What the fast path accepts, json.Unmarshal reads alike: fuzzed over
// lines near the token form.
func FuzzParseTokenLine(f *testing.F) {
	for i, s := range oddTexts {
		f.Add(string(appendTokenLine(nil, task.Event{Type: "token", I: i, T: s, Tok: int32(i)})))
	}
	for _, s := range []string{
		`{"type":"token","i":01,"t":"x","tok":1}`, `{"type":"token","i":-0,"t":"x","tok":1}`,
		`{"type":"token","i":1,"t":"x","tok":2147483648}`, `{"type":"token","i":1,"t":"x","tok":1} `,
		`{"type":"token","i":1,"t":"x\u00","tok":1}`, `{"type":"token","i":1,"t":"x\ud800","tok":1}`,
		`{"type":"token","i":1,"t":"\x01","tok":1}`, `{"type":"token","i":1e2,"t":"x","tok":1}`,
		`{"type":"token","i":99999999999999999999,"t":"x","tok":1}`, `{"type":"token","i":1,"t":"x","tok":1,"x":2}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		ev, ok := parseTokenLine([]byte(line))
		if !ok {
			return
		}
		var want task.Event
		if err := json.Unmarshal([]byte(line), &want); err != nil {
			t.Fatalf("%q: the fast path read %+v, json.Unmarshal fails: %v", line, ev, err)
		}
		if ev.Type != want.Type || ev.I != want.I || ev.T != want.T || ev.Tok != want.Tok || ev.Metrics != nil || ev.Error != nil ||
			want.NodeID != "" || want.StopType != "" || want.TokensOut != 0 || want.Metrics != nil || want.Error != nil {
			t.Fatalf("%q: fast path %+v, json.Unmarshal %+v", line, ev, want)
		}
	})
}

func BenchmarkTokenLine(b *testing.B) {
	ev := task.Event{Type: "token", I: 123, T: " token", Tok: 7}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	line := appendTokenLine(nil, ev)
	b.Run("encode/json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf.Reset()
			_ = enc.Encode(ev)
		}
	})
	b.Run("encode/append", func(b *testing.B) {
		b.ReportAllocs()
		var out []byte
		for b.Loop() {
			out = appendTokenLine(out[:0], ev)
		}
	})
	b.Run("decode/json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var ev task.Event
			_ = json.Unmarshal(line, &ev)
		}
	})
	b.Run("decode/fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = parseTokenLine(line[:len(line)-1])
		}
	})
}
