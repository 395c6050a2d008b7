package modelstore

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
)

// TinyOptions shapes a tiny llama model with random weights. Zero fields
// take the defaults: 2 layers, width 64, 450 tokens, context 256, seed 1,
// name "llorch-tiny" (about 0.5 MB).
type TinyOptions struct {
	Layers, Embd, Vocab, Context int
	Seed                         int64
	Name                         string
}

// Shape of the tiny model beyond the options.
const (
	tinyHeads = 4 // Embd is a multiple of 8: heads of even width, as RoPE rotates pairs
	// tinyBaseVocab is <unk>, <s>, </s> and the 256 byte tokens.
	tinyBaseVocab = 3 + 256
	// Bounds that keep a typo from writing gigabytes.
	tinyMaxLayers  = 64
	tinyMaxEmbd    = 4096
	tinyMaxVocab   = 1 << 18
	tinyMaxContext = 1 << 20
	// tinySuppress is how hard the always-on hidden dimension 0 pushes down
	// the logits of the tokens the model must never emit. It stays well
	// inside float16 range for backends that compute in half precision.
	tinySuppress  = 1000
	ggufAlignment = 32
)

// GGUF value types and GGML tensor types used here.
const (
	ggufUint32  = 4
	ggufInt32   = 5
	ggufFloat32 = 6
	ggufString  = 8
	ggufArray   = 9
	ggmlF32     = 0
)

// llama.cpp token types.
const (
	tokNormal  = 1
	tokUnknown = 2
	tokControl = 3
	tokByte    = 6
)

func (o TinyOptions) withDefaults() TinyOptions {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.Layers, 2)
	def(&o.Embd, 64)
	def(&o.Vocab, 450)
	def(&o.Context, 256)
	if o.Seed == 0 {
		o.Seed = 1
	}
	if o.Name == "" {
		o.Name = "llorch-tiny"
	}
	return o
}

func (o TinyOptions) validate() error {
	switch {
	case o.Layers < 1 || o.Layers > tinyMaxLayers:
		return fmt.Errorf("tiny model: layers must be 1 to %d, not %d", tinyMaxLayers, o.Layers)
	case o.Embd < 8 || o.Embd > tinyMaxEmbd || o.Embd%(2*tinyHeads) != 0:
		return fmt.Errorf("tiny model: embd must be a multiple of %d (%d heads of even width) from 8 to %d, not %d",
			2*tinyHeads, tinyHeads, tinyMaxEmbd, o.Embd)
	case o.Vocab < tinyBaseVocab+1 || o.Vocab > tinyMaxVocab:
		return fmt.Errorf("tiny model: vocab must be %d to %d (3 special and 256 byte tokens come first), not %d",
			tinyBaseVocab+1, tinyMaxVocab, o.Vocab)
	case o.Context < 16 || o.Context > tinyMaxContext:
		return fmt.Errorf("tiny model: context must be 16 to %d, not %d", tinyMaxContext, o.Context)
	}
	return nil
}

// tinyWords fill the vocabulary after the single characters; "▁" is how the
// llama (SentencePiece) tokenizer writes a space.
var tinyWords = []string{
	"the", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are", "with",
	"as", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not",
	"what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each",
	"which", "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many",
	"then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into",
	"time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
	"could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its",
	"now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part",
	"llama", "model", "node", "token", "cluster", "worker", "hello", "world",
}

// tinyVocab returns the tokens and their types: <unk>, <s>, </s>, <0x00> to
// <0xFF>, then printable ASCII characters, "▁", and "▁word" tokens (made-up
// letter strings once the word list runs out) up to n.
func tinyVocab(n int) ([]string, []int32) {
	tokens := []string{"<unk>", "<s>", "</s>"}
	types := []int32{tokUnknown, tokControl, tokControl}
	for b := range 256 {
		tokens = append(tokens, fmt.Sprintf("<0x%02X>", b))
		types = append(types, tokByte)
	}
	seen := map[string]bool{}
	add := func(s string) bool {
		if len(tokens) == n {
			return false
		}
		if !seen[s] {
			seen[s] = true
			tokens = append(tokens, s)
			types = append(types, tokNormal)
		}
		return true
	}
	add("▁")
	for c := byte('!'); c <= '~'; c++ {
		add(string(c))
	}
	for _, w := range tinyWords {
		add("▁" + w)
	}
	// Then "▁a".."▁z", "▁aa".."▁zz", ...: endless and unique.
	for length := 1; len(tokens) < n; length++ {
		for i := range pow26(length) {
			word := make([]byte, length)
			for j, k := length-1, i; j >= 0; j, k = j-1, k/26 {
				word[j] = 'a' + byte(k%26)
			}
			if !add("▁" + string(word)) {
				break
			}
		}
	}
	return tokens, types
}

func pow26(n int) int {
	p := 1
	for range n {
		p *= 26
	}
	return p
}

// tinySuppressed says which tokens the model must never emit: a lone byte
// >= 0x80 is invalid UTF-8 and makes llama-server fail the stream; <unk>,
// <s> and </s> would print nothing useful or end generation early, so
// random-weight generation always runs to its token limit.
func tinySuppressed(id int) bool {
	return id < 3 || id >= 3+0x80 && id < tinyBaseVocab
}

type tinyTensor struct {
	name string
	dims []uint64 // GGML order: dims[0] is the row length
	fill func(data []float32, r *rand.Rand)
}

func (t tinyTensor) elements() uint64 {
	n := uint64(1)
	for _, d := range t.dims {
		n *= d
	}
	return n
}

// tinyTensors lists the tensors llama.cpp's llama architecture loads, with
// how each is filled.
//
// Hidden dimension 0 carries a constant: every token embedding holds 1
// there, and the rows of attn_output and ffn_down that write it are zero,
// so it reaches output_norm unchanged and stays positive after it. The
// suppressed tokens' rows of output.weight are -tinySuppress there and 0
// elsewhere, so their logits are always far below the others.
func tinyTensors(o TinyOptions) []tinyTensor {
	embd, vocab, ff := uint64(o.Embd), uint64(o.Vocab), uint64(2*o.Embd)
	// Uniform in [-s, s] with s = 1/sqrt(fan in) keeps activations near 1.
	uniform := func(fanIn uint64) func([]float32, *rand.Rand) {
		s := float32(1 / math.Sqrt(float64(fanIn)))
		return func(d []float32, r *rand.Rand) {
			for i := range d {
				d[i] = (2*r.Float32() - 1) * s
			}
		}
	}
	ones := func(d []float32, _ *rand.Rand) {
		for i := range d {
			d[i] = 1
		}
	}
	// noWriteToDim0 fills a matrix with rows of width in and zeroes output row 0.
	noWriteToDim0 := func(in uint64) func([]float32, *rand.Rand) {
		u := uniform(in)
		return func(d []float32, r *rand.Rand) {
			u(d, r)
			clear(d[:in])
		}
	}
	ts := []tinyTensor{
		{"token_embd.weight", []uint64{embd, vocab}, func(d []float32, r *rand.Rand) {
			for i := range d {
				d[i] = 2*r.Float32() - 1
			}
			for t := range vocab {
				d[t*embd] = 1
			}
		}},
		{"output_norm.weight", []uint64{embd}, ones},
		{"output.weight", []uint64{embd, vocab}, func(d []float32, r *rand.Rand) {
			uniform(embd)(d, r)
			for t := range vocab {
				row := d[t*embd : (t+1)*embd]
				if tinySuppressed(int(t)) {
					clear(row)
					row[0] = -tinySuppress
				} else {
					row[0] = 0
				}
			}
		}},
	}
	for l := range o.Layers {
		blk := func(s string) string { return fmt.Sprintf("blk.%d.%s.weight", l, s) }
		ts = append(ts,
			tinyTensor{blk("attn_norm"), []uint64{embd}, ones},
			tinyTensor{blk("attn_q"), []uint64{embd, embd}, uniform(embd)},
			tinyTensor{blk("attn_k"), []uint64{embd, embd}, uniform(embd)},
			tinyTensor{blk("attn_v"), []uint64{embd, embd}, uniform(embd)},
			tinyTensor{blk("attn_output"), []uint64{embd, embd}, noWriteToDim0(embd)},
			tinyTensor{blk("ffn_norm"), []uint64{embd}, ones},
			tinyTensor{blk("ffn_gate"), []uint64{embd, ff}, uniform(embd)},
			tinyTensor{blk("ffn_up"), []uint64{embd, ff}, uniform(embd)},
			tinyTensor{blk("ffn_down"), []uint64{ff, embd}, noWriteToDim0(ff)},
		)
	}
	return ts
}

// WriteTiny writes a GGUF v3 file of a tiny llama model with random F32
// weights that llama.cpp loads. The same options give the same bytes.
func WriteTiny(w io.Writer, o TinyOptions) error {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return err
	}
	tokens, types := tinyVocab(o.Vocab)
	tensors := tinyTensors(o)

	g := &ggufWriter{w: bufio.NewWriterSize(w, 1<<16)}
	g.raw([]byte("GGUF"))
	g.u32(3)
	g.u64(uint64(len(tensors)))
	g.u64(13) // metadata key-value pairs, below
	g.kvString("general.architecture", "llama")
	g.kvString("general.name", o.Name)
	g.kvU32("general.file_type", 0) // ALL_F32
	g.kvU32("general.alignment", ggufAlignment)
	g.kvU32("llama.context_length", uint32(o.Context))
	g.kvU32("llama.embedding_length", uint32(o.Embd))
	g.kvU32("llama.block_count", uint32(o.Layers))
	g.kvU32("llama.feed_forward_length", uint32(2*o.Embd))
	g.kvU32("llama.attention.head_count", tinyHeads)
	g.kvF32("llama.attention.layer_norm_rms_epsilon", 1e-5)
	g.kvString("tokenizer.ggml.model", "llama")
	g.str("tokenizer.ggml.tokens")
	g.u32(ggufArray)
	g.u32(ggufString)
	g.u64(uint64(len(tokens)))
	for _, t := range tokens {
		g.str(t)
	}
	// Without the types llama.cpp prints byte tokens as "<0x62>".
	g.str("tokenizer.ggml.token_type")
	g.u32(ggufArray)
	g.u32(ggufInt32)
	g.u64(uint64(len(types)))
	for _, t := range types {
		g.u32(uint32(t))
	}

	var offset uint64
	for _, t := range tensors {
		g.str(t.name)
		g.u32(uint32(len(t.dims)))
		for _, d := range t.dims {
			g.u64(d)
		}
		g.u32(ggmlF32)
		g.u64(offset)
		offset += alignUp(4 * t.elements())
	}
	g.pad()

	// Tensors are drawn in file order from one generator: deterministic.
	r := rand.New(rand.NewPCG(uint64(o.Seed), 0x6c6c6f726368)) // "llorch"
	var buf []byte
	for _, t := range tensors {
		data := make([]float32, t.elements())
		t.fill(data, r)
		buf = buf[:0]
		for _, f := range data {
			buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(f))
		}
		g.raw(buf)
		g.pad()
	}
	if g.err != nil {
		return g.err
	}
	return g.w.Flush()
}

// WriteTinyFile writes the tiny model to path through path+".tmp", so a
// reader never sees half a file.
func WriteTinyFile(path string, o TinyOptions) (err error) {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = WriteTiny(f, o); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func alignUp(n uint64) uint64 { return (n + ggufAlignment - 1) / ggufAlignment * ggufAlignment }

// ggufWriter writes little-endian GGUF fields and keeps the first error.
type ggufWriter struct {
	w   *bufio.Writer
	n   uint64
	err error
}

func (g *ggufWriter) raw(b []byte) {
	if g.err != nil {
		return
	}
	var n int
	n, g.err = g.w.Write(b)
	g.n += uint64(n)
}

func (g *ggufWriter) u32(v uint32) { g.raw(binary.LittleEndian.AppendUint32(nil, v)) }
func (g *ggufWriter) u64(v uint64) { g.raw(binary.LittleEndian.AppendUint64(nil, v)) }
func (g *ggufWriter) str(s string) { g.u64(uint64(len(s))); g.raw([]byte(s)) }
func (g *ggufWriter) pad()         { g.raw(make([]byte, alignUp(g.n)-g.n)) }

func (g *ggufWriter) kvString(k, v string) { g.str(k); g.u32(ggufString); g.str(v) }
func (g *ggufWriter) kvU32(k string, v uint32) {
	g.str(k)
	g.u32(ggufUint32)
	g.u32(v)
}
func (g *ggufWriter) kvF32(k string, v float32) {
	g.str(k)
	g.u32(ggufFloat32)
	g.u32(math.Float32bits(v))
}
