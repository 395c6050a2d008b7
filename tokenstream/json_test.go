package tokenstream

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

var jsonStrings = []string{
	"", "a", " tok", "héllo wörld", "日本語", "emoji 🦙", "\"quoted\"", `back\slash`, "tab\tnl\ncr\r",
	"\b\f\x00\x01\x1f\x7f", "<script>&amp;</script>", "\u2028\u2029", "bad \xff\xfe utf8", "\xe2\x80",
	"trail\xc3", "\xed\xa0\x80 surrogate", "\U0010FFFF", "mixed <\"\\\u2028\xff>",
}

func TestAppendJSONString(t *testing.T) {
	for c := rune(0); c < 0x3000; c++ {
		jsonStrings = append(jsonStrings, string(c), "x"+string(c)+"y")
	}
	for b := 0; b < 256; b++ {
		jsonStrings = append(jsonStrings, string([]byte{byte(b)}), "a"+string([]byte{byte(b)})+"b")
	}
	for _, s := range jsonStrings {
		want, err := json.Marshal(s)
		require.NoError(t, err)
		require.Equal(t, string(want), string(AppendJSONString(nil, s)), "%q", s)
	}
}

func FuzzAppendJSONString(f *testing.F) {
	for _, s := range jsonStrings {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, _ := json.Marshal(s)
		if got := AppendJSONString([]byte("x"), s); string(got[1:]) != string(want) {
			t.Fatalf("%q: got %s, want %s", s, got[1:], want)
		}
	})
}
