package engine_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/grammar"
)

// A bounded schema: every document it accepts is short, so a generation
// under its grammar always ends (stop_type eos) within the budget.
const boundedSchema = `{
  "type": "object",
  "properties": {
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "n": {"type": "integer"},
    "nick": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 3},
    "when": {"type": "string", "format": "date"},
    "maybe": {"type": ["null", "boolean"]}
  },
  "required": ["ok", "color", "tags"],
  "$defs": {"tag": {"type": "string", "enum": ["a", "b\"q", "c\\d"]}}
}`

func grammarBody(g string, seed, n int, temp float64) string {
	q, _ := json.Marshal(g)
	return fmt.Sprintf(`{"prompt":"Once upon a time","n_predict":%d,"temperature":%g,"top_k":0,"top_p":1,"seed":%d,"grammar":%s}`, n, temp, seed, q)
}

// Sampling under a grammar from a schema gives documents the schema
// accepts, whatever the seed; under json_object's, JSON objects (or, cut
// at the token limit, the start of one).
func TestGrammarHoldsOutputToSchema(t *testing.T) {
	s := loadedEngine(t, engine.Options{Parallel: 1})
	g, err := grammar.FromSchema([]byte(boundedSchema))
	require.NoError(t, err)
	c := jsonschema.NewCompiler()
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader([]byte(boundedSchema)))
	require.NoError(t, err)
	require.NoError(t, c.AddResource("bounded.json", doc))
	sch, err := c.Compile("bounded.json")
	require.NoError(t, err)
	for seed := 1; seed <= 6; seed++ {
		out := complete(t, s, grammarBody(g, seed, 400, 1))
		require.Equal(t, "eos", out.StopType, "seed %d: a bounded schema's document ends: %q", seed, out.Content)
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader([]byte(out.Content)))
		require.NoError(t, err, "seed %d: %q", seed, out.Content)
		require.NoError(t, sch.Validate(v), "seed %d: %q", seed, out.Content)
	}
	obj := grammar.JSONObject()
	for seed := 1; seed <= 4; seed++ {
		out := complete(t, s, grammarBody(obj, seed, 120, 1))
		var v any
		err := json.NewDecoder(bytes.NewReader([]byte(out.Content))).Decode(&v)
		if out.StopType == "eos" {
			require.NoError(t, err, "seed %d: %q", seed, out.Content)
			require.IsType(t, map[string]any{}, v, out.Content)
		} else {
			require.True(t, err == nil || errors.Is(err, io.ErrUnexpectedEOF), "seed %d: cut short, still the start of JSON: %q (%v)", seed, out.Content, err)
			require.Equal(t, byte('{'), out.Content[0])
		}
	}
	code, body := post(t, s.URL()+"/completion", grammarBody("root ::= nonsense (", 1, 4, 0))
	require.Equal(t, http.StatusBadRequest, code, string(body))
	require.Contains(t, string(body), "grammar")
}

// A resumed generation under a grammar goes on where it stopped: the
// produced tokens move the grammar on, so the continuation equals the
// uninterrupted generation's.
func TestGrammarResumes(t *testing.T) {
	s := loadedEngine(t, engine.Options{Parallel: 1})
	g, err := grammar.FromSchema([]byte(boundedSchema))
	require.NoError(t, err)
	whole := complete(t, s, `{"prompt":"Once upon a time","n_predict":400,"temperature":0,"return_tokens":true,"grammar":`+quote(g)+`}`)
	require.Equal(t, "eos", whole.StopType, whole.Content)
	require.Greater(t, len(whole.Tokens), 6)
	code, raw := post(t, s.URL()+"/tokenize", `{"content":"Once upon a time","add_special":true}`)
	require.Equal(t, 200, code)
	var tk struct{ Tokens []int32 }
	require.NoError(t, json.Unmarshal(raw, &tk))
	at := len(whole.Tokens) / 2
	prompt, _ := json.Marshal(append(append([]int32{}, tk.Tokens...), whole.Tokens[:at]...))
	rest := complete(t, s, fmt.Sprintf(`{"prompt":%s,"resume_at":%d,"n_predict":400,"temperature":0,"return_tokens":true,"grammar":%s}`, prompt, len(tk.Tokens), quote(g)))
	require.Equal(t, whole.Tokens[at:], rest.Tokens, "the continuation of a resumed grammar generation")
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
