package engine

import (
	"encoding/json"
	"math"
	"testing"
)

// The /completion decoders: a prompt is a string or token ids; logit_bias
// is pairs or an object; anything else is an error, never a panic.
func FuzzCompletionDecoders(f *testing.F) {
	for _, s := range []string{`"hello"`, `[1,2,3]`, `[[1,-1.5],[2,false]]`, `{"7":3}`, `[["x",1]]`, `null`, `[1,"a"]`, `{"a":1}`, `[[1]]`, `[[1,true]]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if !json.Valid(raw) {
			return
		}
		if p, err := parsePrompt(raw); err == nil && p.Tokens == nil {
			var s string
			if json.Unmarshal(raw, &s) != nil || s != p.Text {
				t.Fatalf("prompt %s read as text %q", raw, p.Text)
			}
		}
		bias, err := parseLogitBias(raw)
		if err != nil {
			return
		}
		for _, b := range bias {
			if math.IsNaN(float64(b.Bias)) || (math.IsInf(float64(b.Bias), 0) && b.Bias > 0) {
				t.Fatalf("bias %v from %s", b, raw)
			}
		}
	})
}

func TestLogitBiasRange(t *testing.T) {
	if _, err := parseLogitBias([]byte(`{"1":1e300}`)); err == nil {
		t.Fatal("a bias beyond float32 must be refused")
	}
}
