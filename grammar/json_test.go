package grammar

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// What the grammar cannot enforce is refused, naming where and what.
func TestFromSchemaRefusesWhatItCannotEnforce(t *testing.T) {
	cases := []struct{ schema, path, keyword string }{
		{`{"type":"string","pattern":"^a+$"}`, "", "pattern"},
		{`{"type":"string","format":"email"}`, "", "format"},
		{`{"type":"integer","minimum":3}`, "", "minimum"},
		{`{"type":"object","properties":{"a":{"type":"number","multipleOf":2}}}`, "/properties/a", "multipleOf"},
		{`{"allOf":[{"type":"object"},{"required":["a"]}]}`, "", "allOf"},
		{`{"$ref":"https://example.com/s.json"}`, "", "$ref"},
		{`{"$ref":"#/$defs/missing"}`, "", "$ref"},
		{`{"type":"object","properties":{"a":{}},"required":["b"]}`, "", "required"},
		{`{"type":"array","items":{"type":"string"},"uniqueItems":true}`, "", "uniqueItems"},
		{`{"type":"array","minItems":3,"maxItems":2}`, "", "maxItems"},
		{`{"type":"string","maxLength":100000}`, "", "maxLength"},
		{`{"type":"strung"}`, "", "type"},
		{`{"enum":[]}`, "", "enum"},
		{`{"properties":{"a/b":{"not":{}}}}`, "/properties/a~1b", "not"},
	}
	for _, c := range cases {
		_, err := FromSchema([]byte(c.schema))
		var se *SchemaError
		require.True(t, errors.As(err, &se), "%s: %v", c.schema, err)
		require.Equal(t, c.path, se.Path, c.schema)
		require.Equal(t, c.keyword, se.Keyword, c.schema)
	}
	_, err := FromSchema([]byte(`false`))
	require.Error(t, err)
	_, err = FromSchema([]byte(`{"type":`))
	require.ErrorContains(t, err, "not JSON")
	_, err = FromSchema([]byte(`{"description":"` + strings.Repeat("x", MaxSchemaBytes) + `"}`))
	require.ErrorContains(t, err, "bytes")
}

// Annotations are read past; a recursive definition refers to its own
// rule; the same sub-schema twice is one rule.
func TestFromSchemaShapes(t *testing.T) {
	g, err := FromSchema([]byte(`{"title":"t","description":"d","$schema":"https://json-schema.org/draft/2020-12/schema",
		"type":"object","properties":{"x":{"type":"string","maxLength":3},"y":{"type":"string","maxLength":3},
		"node":{"$ref":"#/$defs/node"}},"required":["x"],
		"$defs":{"node":{"type":"object","properties":{"kids":{"type":"array","items":{"$ref":"#/$defs/node"},"maxItems":2}}}}}`))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(g, "root ::= "), g)
	require.Equal(t, 1, strings.Count(g, `"\"" char{0,3} "\""`), "one rule for both bounded strings:\n%s", g)
	require.Contains(t, g, "d0 ::= ", "the definition's rule:\n%s", g)
	require.Contains(t, JSONObject(), "root ::= object\n")
	for _, rule := range strings.Split(strings.TrimSpace(g), "\n") {
		name, body, ok := strings.Cut(rule, " ::= ")
		require.True(t, ok && name != "" && body != "", "rule %q", rule)
	}
}

func TestLiteralEscapes(t *testing.T) {
	require.Equal(t, `"\"a\\\"b\""`, literal(`a"b`))
	require.Equal(t, `"\"t\\\\u\""`, literal(`t\u`))
	require.Equal(t, `"null"`, literal(nil))
	require.Equal(t, `"true"`, literal(true))
}

// A schema is a client's input: whatever it is, FromSchema answers a
// grammar or an error, and a grammar has its root first and no empty rule.
func FuzzFromSchema(f *testing.F) {
	for _, s := range []string{
		`{"type":"object","properties":{"a":{"type":"string","maxLength":3}},"required":["a"]}`,
		`{"$defs":{"n":{"type":"array","items":{"$ref":"#/$defs/n"},"maxItems":2}},"$ref":"#/$defs/n"}`,
		`{"anyOf":[{"type":"integer"},{"enum":["x\"",null,1.5]}]}`, `{"type":["string","null"],"format":"date-time"}`,
		`true`, `false`, `{"pattern":"a"}`, `{"minItems":2,"maxItems":1}`, `{"$ref":"#/$defs/x"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, schema []byte) {
		g, err := FromSchema(schema)
		if err != nil {
			return
		}
		require.True(t, strings.HasPrefix(g, "root ::= "), g)
		for _, rule := range strings.Split(strings.TrimSpace(g), "\n") {
			_, body, ok := strings.Cut(rule, " ::= ")
			require.True(t, ok && strings.TrimSpace(body) != "", "rule %q in\n%s", rule, g)
		}
	})
}
