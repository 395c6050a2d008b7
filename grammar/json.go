// Package grammar writes GBNF grammars (llama.cpp's grammar format, which
// both engines take in /completion's "grammar") that hold sampling to
// JSON: any JSON object (OpenAI's json_object), or the documents a JSON
// Schema accepts (json_schema).
//
// A schema keyword the grammar cannot enforce is an error naming it, never
// dropped: the output of a grammar from FromSchema always validates
// against its schema. Whitespace is bounded (at most one space between
// tokens), so a model cannot fill its budget with it.
package grammar

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// MaxSchemaBytes bounds a schema's JSON; MaxRules bounds the grammar made
// of it (a schema is a client's input).
const (
	MaxSchemaBytes = 64 << 10
	MaxRules       = 512
)

// primitives are the rules every grammar may use, by name.
var primitives = map[string]string{
	"ws":      `[ ]?`,
	"char":    `[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})`,
	"string":  `"\"" char* "\""`,
	"integer": `"-"? ([0-9] | [1-9] [0-9]{1,15})`,
	"number":  `"-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?`,
	"boolean": `"true" | "false"`,
	"null":    `"null"`,
	"value":   `object | array | string | number | boolean | null`,
	"object":  `"{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"`,
	"array":   `"[" ws ( value ( ws "," ws value )* )? ws "]"`,
	"date":    `[0-9] [0-9] [0-9] [0-9] "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )`,
	"time":    `( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? ( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )`,
	"uuid":    `"\"" hex{8} "-" hex{4} "-" hex{4} "-" hex{4} "-" hex{12} "\""`,
	"hex":     `[0-9a-fA-F]`,
}

// uses says which primitives a primitive refers to.
var uses = map[string][]string{
	"string": {"char"}, "value": {"object", "array", "string", "number", "boolean", "null"},
	"object": {"ws", "string", "value"}, "array": {"ws", "value"}, "uuid": {"hex"},
}

// JSONObject is a grammar of any JSON object (response_format
// json_object).
func JSONObject() string {
	b := newBuilder(nil)
	b.root(b.prim("object"))
	return b.String()
}

// SchemaError is a schema the grammar cannot enforce; Path is where in the
// schema (a JSON pointer), Keyword what.
type SchemaError struct {
	Path, Keyword, Reason string
}

func (e *SchemaError) Error() string {
	at := e.Path
	if at == "" {
		at = "the schema's root"
	}
	if e.Keyword == "" {
		return fmt.Sprintf("%s: %s", at, e.Reason)
	}
	return fmt.Sprintf("%s: %s %s", at, e.Keyword, e.Reason)
}

// FromSchema is a grammar of the JSON documents schema accepts, for the
// subset of JSON Schema it enforces: type (one or several), enum, const,
// properties with required (in the order properties lists them; optional
// ones may each appear), items with minItems and maxItems, anyOf and
// oneOf (as alternatives), $ref into $defs or definitions, minLength and
// maxLength, and formats date, time, date-time and uuid. Annotations
// (title, description, default, examples, ...) are read past.
func FromSchema(schema []byte) (string, error) {
	if len(schema) > MaxSchemaBytes {
		return "", &SchemaError{Reason: fmt.Sprintf("is %d bytes, above %d", len(schema), MaxSchemaBytes)}
	}
	var root any
	dec := json.NewDecoder(bytes.NewReader(schema))
	dec.UseNumber()
	if err := dec.Decode(&root); err != nil {
		return "", &SchemaError{Reason: "is not JSON: " + err.Error()}
	}
	b := newBuilder(root)
	name, err := b.schema(root, "")
	if err != nil {
		return "", err
	}
	b.root(name)
	return b.String(), nil
}

type builder struct {
	doc   any               // the whole schema, for $ref
	rules map[string]string // name -> body
	order []string
	refs  map[string]string // $ref -> its rule's name
	bodyN map[string]string // body -> the rule that has it
}

func newBuilder(doc any) *builder {
	return &builder{doc: doc, rules: map[string]string{}, refs: map[string]string{}, bodyN: map[string]string{}}
}

func (b *builder) root(name string) {
	b.rules["root"] = name
	b.order = append([]string{"root"}, b.order...)
}

// prim makes a primitive (and those it uses) part of the grammar.
func (b *builder) prim(name string) string {
	if _, ok := b.rules[name]; ok {
		return name
	}
	b.rules[name] = primitives[name]
	b.order = append(b.order, name)
	for _, u := range uses[name] {
		b.prim(u)
	}
	return name
}

// rule adds body under a fresh name (or the name a rule with the same
// body has).
func (b *builder) rule(body string) (string, error) {
	if n, ok := b.bodyN[body]; ok {
		return n, nil
	}
	if len(b.rules) >= MaxRules {
		return "", &SchemaError{Reason: fmt.Sprintf("needs more than %d grammar rules", MaxRules)}
	}
	name := "r" + strconv.Itoa(len(b.bodyN))
	b.rules[name], b.bodyN[body] = body, name
	b.order = append(b.order, name)
	return name, nil
}

// String is the grammar, root first.
func (b *builder) String() string {
	var s strings.Builder
	for _, n := range b.order {
		fmt.Fprintf(&s, "%s ::= %s\n", n, b.rules[n])
	}
	return s.String()
}

// annotations are keywords that constrain nothing.
var annotations = []string{"$schema", "$id", "$comment", "$anchor", "title", "description", "default", "examples",
	"deprecated", "readOnly", "writeOnly", "$defs", "definitions", "contentMediaType", "contentEncoding"}

// handled are the keywords schema reads.
var handled = []string{"type", "enum", "const", "properties", "required", "additionalProperties", "items",
	"minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "format", "nullable"}

// schema is the rule of the documents s accepts; path is its JSON pointer.
func (b *builder) schema(s any, path string) (string, error) {
	switch v := s.(type) {
	case bool:
		if !v {
			return "", &SchemaError{Path: path, Reason: "is false: no document is valid"}
		}
		return b.prim("value"), nil
	case map[string]any:
		return b.object(v, path)
	}
	return "", &SchemaError{Path: path, Reason: "must be an object or a boolean"}
}

func (b *builder) object(s map[string]any, path string) (string, error) {
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !slices.Contains(handled, k) && !slices.Contains(annotations, k) {
			return "", &SchemaError{Path: path, Keyword: k, Reason: "is not enforced by the grammar"}
		}
	}
	if ref, ok := s["$ref"]; ok {
		if len(keys) > 1 && !onlyAnnotations(keys, "$ref") {
			return "", &SchemaError{Path: path, Keyword: "$ref", Reason: "beside other constraints is not enforced"}
		}
		return b.ref(ref, path)
	}
	if c, ok := s["const"]; ok {
		return b.rule(literal(c))
	}
	if e, ok := s["enum"]; ok {
		vals, ok := e.([]any)
		if !ok || len(vals) == 0 {
			return "", &SchemaError{Path: path, Keyword: "enum", Reason: "must be a non-empty array"}
		}
		alts := make([]string, len(vals))
		for i, v := range vals {
			alts[i] = literal(v)
		}
		return b.rule(strings.Join(alts, " | "))
	}
	for _, k := range []string{"anyOf", "oneOf", "allOf"} {
		if alts, ok := s[k]; ok {
			return b.alternatives(k, alts, path)
		}
	}
	types, err := typesOf(s, path)
	if err != nil {
		return "", err
	}
	alts := make([]string, 0, len(types))
	for _, t := range types {
		r, err := b.typed(t, s, path)
		if err != nil {
			return "", err
		}
		alts = append(alts, r)
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return b.rule(strings.Join(alts, " | "))
}

func onlyAnnotations(keys []string, but string) bool {
	for _, k := range keys {
		if k != but && !slices.Contains(annotations, k) {
			return false
		}
	}
	return true
}

// typesOf is the types s allows: its type keyword (a name or a list), or
// every type when it names none.
func typesOf(s map[string]any, path string) ([]string, error) {
	var types []string
	switch t := s["type"].(type) {
	case nil:
		types = []string{"value"}
	case string:
		types = []string{t}
	case []any:
		for _, x := range t {
			name, ok := x.(string)
			if !ok {
				return nil, &SchemaError{Path: path, Keyword: "type", Reason: "must list type names"}
			}
			types = append(types, name)
		}
	default:
		return nil, &SchemaError{Path: path, Keyword: "type", Reason: "must be a type name or a list of them"}
	}
	if len(types) == 0 {
		return nil, &SchemaError{Path: path, Keyword: "type", Reason: "lists no type: no document is valid"}
	}
	if n, _ := s["nullable"].(bool); n && !slices.Contains(types, "null") {
		types = append(types, "null")
	}
	for _, t := range types {
		switch t {
		case "value", "object", "array", "string", "number", "integer", "boolean", "null":
		default:
			return nil, &SchemaError{Path: path, Keyword: "type", Reason: fmt.Sprintf("%q is not a JSON Schema type", t)}
		}
	}
	return types, nil
}

// typed is the rule of documents of type t that s accepts.
func (b *builder) typed(t string, s map[string]any, path string) (string, error) {
	switch t {
	case "object":
		if _, ok := s["properties"]; !ok {
			if req, _ := s["required"].([]any); len(req) > 0 {
				return "", &SchemaError{Path: path, Keyword: "required", Reason: "names properties the schema does not define"}
			}
			return b.prim("object"), nil
		}
		return b.properties(s, path)
	case "array":
		return b.array(s, path)
	case "string":
		return b.str(s, path)
	case "value":
		if _, ok := s["properties"]; ok {
			return b.properties(s, path)
		}
		if _, ok := s["items"]; ok {
			return b.array(s, path)
		}
		return b.prim("value"), nil
	}
	return b.prim(t), nil
}

func (b *builder) properties(s map[string]any, path string) (string, error) {
	props, ok := s["properties"].(map[string]any)
	if !ok {
		return "", &SchemaError{Path: path, Keyword: "properties", Reason: "must be an object"}
	}
	required := map[string]bool{}
	if r, ok := s["required"]; ok {
		list, ok := r.([]any)
		if !ok {
			return "", &SchemaError{Path: path, Keyword: "required", Reason: "must be an array of names"}
		}
		for _, x := range list {
			name, ok := x.(string)
			if !ok {
				return "", &SchemaError{Path: path, Keyword: "required", Reason: "must be an array of names"}
			}
			if _, defined := props[name]; !defined {
				return "", &SchemaError{Path: path, Keyword: "required", Reason: fmt.Sprintf("names %q, which properties does not define", name)}
			}
			required[name] = true
		}
	}
	// The properties in a fixed order (JSON objects have none): sorted.
	names := make([]string, 0, len(props))
	for k := range props {
		names = append(names, k)
	}
	sort.Strings(names)
	b.prim("ws")
	var req, opt []string
	for _, n := range names {
		vr, err := b.schema(props[n], path+"/properties/"+pointerEscape(n))
		if err != nil {
			return "", err
		}
		kv := literal(n) + ` ws ":" ws ` + vr
		if required[n] {
			req = append(req, kv)
		} else {
			opt = append(opt, kv)
		}
	}
	var body string
	switch {
	case len(req) > 0:
		body = strings.Join(req, ` ws "," ws `)
		for _, kv := range opt {
			body += ` ( ws "," ws ` + kv + ` )?`
		}
	case len(opt) > 0:
		// Any subset of the optional ones, in order: the first present
		// one has no comma before it.
		next := ""
		for i := len(opt) - 1; i >= 0; i-- {
			rest := ""
			for _, kv := range opt[i+1:] {
				rest += ` ( ws "," ws ` + kv + ` )?`
			}
			alt := opt[i] + rest
			if next != "" {
				alt += " | " + next
			}
			r, err := b.rule(alt)
			if err != nil {
				return "", err
			}
			next = r
		}
		body = "( " + next + " )?"
	}
	if body == "" {
		return b.rule(`"{" ws "}"`)
	}
	return b.rule(`"{" ws ` + body + ` ws "}"`)
}

func (b *builder) array(s map[string]any, path string) (string, error) {
	item := b.prim("value")
	if it, ok := s["items"]; ok {
		var err error
		if item, err = b.schema(it, path+"/items"); err != nil {
			return "", err
		}
	}
	lo, hi, err := bounds(s, "minItems", "maxItems", path)
	if err != nil {
		return "", err
	}
	b.prim("ws")
	more := ` ( ws "," ws ` + item + ` )`
	var body string
	switch {
	case hi == 0:
		body = ""
	case lo == 0:
		body = "( " + item + more + repeat(0, hi-1) + " )?"
	default:
		body = item + more + repeat(lo-1, hi-1)
	}
	return b.rule(`"[" ws ` + body + ` ws "]"`)
}

func (b *builder) str(s map[string]any, path string) (string, error) {
	if f, ok := s["format"]; ok {
		if _, ok := s["minLength"]; ok {
			return "", &SchemaError{Path: path, Keyword: "minLength", Reason: "beside format is not enforced"}
		}
		if _, ok := s["maxLength"]; ok {
			return "", &SchemaError{Path: path, Keyword: "maxLength", Reason: "beside format is not enforced"}
		}
		switch f {
		case "date":
			return b.rule(`"\"" ` + b.prim("date") + ` "\""`)
		case "time":
			return b.rule(`"\"" ` + b.prim("time") + ` "\""`)
		case "date-time":
			return b.rule(`"\"" ` + b.prim("date") + ` "T" ` + b.prim("time") + ` "\""`)
		case "uuid":
			return b.prim("uuid"), nil
		}
		return "", &SchemaError{Path: path, Keyword: "format", Reason: fmt.Sprintf("%v is not enforced (date, time, date-time and uuid are)", f)}
	}
	lo, hi, err := bounds(s, "minLength", "maxLength", path)
	if err != nil {
		return "", err
	}
	if lo == 0 && hi < 0 {
		return b.prim("string"), nil
	}
	b.prim("char")
	return b.rule(`"\"" char` + repeat(lo, hi) + ` "\""`)
}

// repeat is GBNF's {lo,hi} (hi < 0: no upper bound).
func repeat(lo, hi int) string {
	switch {
	case hi < 0:
		return fmt.Sprintf("{%d,}", lo)
	case lo == hi:
		return fmt.Sprintf("{%d}", lo)
	}
	return fmt.Sprintf("{%d,%d}", lo, hi)
}

// maxRepeat bounds minItems, maxItems, minLength and maxLength: an
// engine expands a bounded repetition into as many rules.
const maxRepeat = 1000

// bounds reads the lower and upper bound keywords (hi -1: none).
func bounds(s map[string]any, loKey, hiKey, path string) (lo, hi int, err error) {
	read := func(k string, def int) (int, error) {
		v, ok := s[k]
		if !ok {
			return def, nil
		}
		n, isNum := v.(json.Number)
		i, convErr := n.Int64()
		if !isNum || convErr != nil || i < 0 || i > maxRepeat {
			return 0, &SchemaError{Path: path, Keyword: k, Reason: fmt.Sprintf("must be an integer from 0 to %d", maxRepeat)}
		}
		return int(i), nil
	}
	if lo, err = read(loKey, 0); err != nil {
		return 0, 0, err
	}
	if hi, err = read(hiKey, -1); err != nil {
		return 0, 0, err
	}
	if hi >= 0 && hi < lo {
		return 0, 0, &SchemaError{Path: path, Keyword: hiKey, Reason: "is below " + loKey}
	}
	return lo, hi, nil
}

func (b *builder) alternatives(k string, v any, path string) (string, error) {
	list, ok := v.([]any)
	if !ok || len(list) == 0 {
		return "", &SchemaError{Path: path, Keyword: k, Reason: "must be a non-empty array of schemas"}
	}
	if k == "allOf" && len(list) > 1 {
		return "", &SchemaError{Path: path, Keyword: k, Reason: "of more than one schema is not enforced"}
	}
	alts := make([]string, len(list))
	for i, s := range list {
		r, err := b.schema(s, fmt.Sprintf("%s/%s/%d", path, k, i))
		if err != nil {
			return "", err
		}
		alts[i] = r
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return b.rule(strings.Join(alts, " | "))
}

// ref is the rule of a local reference, #/$defs/X or #/definitions/X; a
// recursive one refers to its own rule.
func (b *builder) ref(v any, path string) (string, error) {
	ref, _ := v.(string)
	if n, ok := b.refs[ref]; ok {
		return n, nil
	}
	var where string
	switch {
	case strings.HasPrefix(ref, "#/$defs/"):
		where = "$defs"
	case strings.HasPrefix(ref, "#/definitions/"):
		where = "definitions"
	default:
		return "", &SchemaError{Path: path, Keyword: "$ref", Reason: fmt.Sprintf("%q is not a reference into #/$defs or #/definitions", ref)}
	}
	root, _ := b.doc.(map[string]any)
	defs, _ := root[where].(map[string]any)
	key := pointerUnescape(strings.TrimPrefix(ref, "#/"+where+"/"))
	target, ok := defs[key]
	if !ok {
		return "", &SchemaError{Path: path, Keyword: "$ref", Reason: fmt.Sprintf("%q names no definition", ref)}
	}
	if len(b.rules) >= MaxRules {
		return "", &SchemaError{Reason: fmt.Sprintf("needs more than %d grammar rules", MaxRules)}
	}
	// The name first, so a definition that refers to itself finds it.
	name := "d" + strconv.Itoa(len(b.refs))
	b.refs[ref] = name
	b.rules[name] = "" // reserved
	b.order = append(b.order, name)
	body, err := b.schema(target, "/"+where+"/"+pointerEscape(key))
	if err != nil {
		return "", err
	}
	b.rules[name] = body
	return name, nil
}

// literal is the GBNF of exactly v's JSON.
func literal(v any) string {
	raw, _ := json.Marshal(v)
	var s strings.Builder
	s.WriteByte('"')
	for _, c := range string(raw) {
		switch {
		case c == '"' || c == '\\':
			s.WriteByte('\\')
			s.WriteRune(c)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&s, `\x%02X`, c)
		default:
			s.WriteRune(c)
		}
	}
	s.WriteByte('"')
	return s.String()
}

func pointerEscape(s string) string {
	return strings.NewReplacer("~", "~0", "/", "~1").Replace(s)
}

func pointerUnescape(s string) string {
	return strings.NewReplacer("~1", "/", "~0", "~").Replace(s)
}
