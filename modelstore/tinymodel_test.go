package modelstore

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"unicode/utf8"

	parser "github.com/gpustack/gguf-parser-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func tinyBytes(t *testing.T, o TinyOptions) []byte {
	t.Helper()
	var b bytes.Buffer
	require.NoError(t, WriteTiny(&b, o))
	return b.Bytes()
}

// tinyParams is the weight count of a tiny model, computed independently of
// the writer's tensor list.
func tinyParams(layers, embd, vocab int) uint64 {
	ff := 2 * embd
	perLayer := 2*embd + 4*embd*embd + 3*embd*ff
	return uint64(2*vocab*embd + embd + layers*perLayer)
}

func TestTinyFileParsesWithGGUFParser(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, WriteTinyFile(path, TinyOptions{}))
	_, err := os.Stat(path + ".tmp")
	assert.ErrorIs(t, err, os.ErrNotExist, "the temporary file is renamed away")
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.InDelta(t, 550_000, st.Size(), 100_000, "about 0.5 MB with defaults")

	gf, err := parser.ParseGGUFFile(path) // everything, token list included
	require.NoError(t, err)
	assert.Equal(t, parser.GGUFVersionV3, gf.Header.Version)
	assert.Equal(t, parser.GGUFMagicGGUFLe, gf.Header.Magic)
	assert.Equal(t, uint64(3+9*2), gf.Header.TensorCount)
	assert.Equal(t, uint64(tinyParams(2, 64, 450)), uint64(gf.ModelParameters))

	kv := func(k string) parser.GGUFMetadataKV {
		v, ok := gf.Header.MetadataKV.Get(k)
		require.True(t, ok, k)
		return v
	}
	assert.Equal(t, "llama", kv("general.architecture").ValueString())
	assert.Equal(t, "llorch-tiny", kv("general.name").ValueString())
	assert.Equal(t, uint32(256), kv("llama.context_length").ValueUint32())
	assert.Equal(t, uint32(64), kv("llama.embedding_length").ValueUint32())
	assert.Equal(t, uint32(2), kv("llama.block_count").ValueUint32())
	assert.Equal(t, uint32(128), kv("llama.feed_forward_length").ValueUint32())
	assert.Equal(t, uint32(4), kv("llama.attention.head_count").ValueUint32())
	assert.InDelta(t, 1e-5, kv("llama.attention.layer_norm_rms_epsilon").ValueFloat32(), 1e-9)
	assert.Equal(t, "llama", kv("tokenizer.ggml.model").ValueString())
	tokens := kv("tokenizer.ggml.tokens").ValueArray()
	types := kv("tokenizer.ggml.token_type").ValueArray()
	require.Equal(t, uint64(450), tokens.Len)
	require.Equal(t, uint64(450), types.Len)
	assert.Equal(t, "<unk>", tokens.Array[0])
	assert.Equal(t, "<s>", tokens.Array[1])
	assert.Equal(t, "</s>", tokens.Array[2])
	assert.Equal(t, "<0x00>", tokens.Array[3])
	assert.Equal(t, "<0xFF>", tokens.Array[258])
	assert.Equal(t, []any{int32(2), int32(3), int32(3), int32(6)}, types.Array[:4])
	assert.Equal(t, int32(6), types.Array[258])
	assert.Equal(t, int32(1), types.Array[259])

	// Layout: every tensor F32, data aligned to 32 and laid end to end, and
	// the file ends with the last tensor.
	assert.Zero(t, gf.TensorDataStartOffset%32)
	var want uint64
	for _, ti := range gf.TensorInfos {
		assert.Equal(t, parser.GGMLTypeF32, ti.Type, ti.Name)
		assert.Equal(t, want, ti.Offset, ti.Name)
		want += (ti.Bytes() + 31) / 32 * 32
	}
	assert.Equal(t, uint64(st.Size()), uint64(gf.TensorDataStartOffset)+want)
	for _, name := range []string{"token_embd.weight", "output_norm.weight", "output.weight",
		"blk.1.attn_norm.weight", "blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight",
		"blk.1.attn_output.weight", "blk.1.ffn_norm.weight", "blk.1.ffn_gate.weight",
		"blk.1.ffn_up.weight", "blk.1.ffn_down.weight"} {
		_, ok := gf.TensorInfos.Get(name)
		assert.True(t, ok, name)
	}
	down, _ := gf.TensorInfos.Get("blk.0.ffn_down.weight")
	assert.Equal(t, []uint64{128, 64}, down.Dimensions, "GGML order: row length first")
}

func TestTinyDeterministic(t *testing.T) {
	a := tinyBytes(t, TinyOptions{Seed: 7})
	assert.Equal(t, a, tinyBytes(t, TinyOptions{Seed: 7}), "same seed, same bytes")
	b := tinyBytes(t, TinyOptions{Seed: 8})
	assert.Equal(t, len(a), len(b))
	assert.NotEqual(t, a, b, "different seed, different weights")
	assert.Equal(t, tinyBytes(t, TinyOptions{}), tinyBytes(t, TinyOptions{Seed: 1, Layers: 2, Embd: 64, Vocab: 450, Context: 256, Name: "llorch-tiny"}),
		"zero options are the defaults")
}

func TestTinyOptionsValidation(t *testing.T) {
	for _, tc := range []struct {
		o    TinyOptions
		want string
	}{
		{TinyOptions{Layers: -1}, "layers must be 1 to 64, not -1"},
		{TinyOptions{Layers: 65}, "layers must be 1 to 64"},
		{TinyOptions{Embd: 4}, "embd must be a multiple of 8"},
		{TinyOptions{Embd: 68}, "not 68"},
		{TinyOptions{Embd: 8192}, "from 8 to 4096"},
		{TinyOptions{Vocab: 259}, "vocab must be 260 to"},
		{TinyOptions{Vocab: 1 << 20}, "vocab must be"},
		{TinyOptions{Context: 15}, "context must be 16 to"},
		{TinyOptions{Context: -5}, "not -5"},
	} {
		err := WriteTiny(&bytes.Buffer{}, tc.o)
		if assert.Error(t, err, "%+v", tc.o) {
			assert.Contains(t, err.Error(), tc.want)
		}
		err = WriteTinyFile(filepath.Join(t.TempDir(), "x.gguf"), tc.o)
		assert.Error(t, err)
	}
	// The smallest model that is allowed is written.
	assert.NoError(t, WriteTiny(&bytes.Buffer{}, TinyOptions{Layers: 1, Embd: 8, Vocab: 260, Context: 16}))
}

func TestTinyVocab(t *testing.T) {
	for _, n := range []int{260, 450, 2000} {
		tokens, types := tinyVocab(n)
		require.Len(t, tokens, n)
		require.Len(t, types, n)
		seen := map[string]bool{}
		for i, tok := range tokens {
			assert.True(t, utf8.ValidString(tok), tok)
			assert.False(t, seen[tok], "duplicate %q", tok)
			seen[tok] = true
			if i >= tinyBaseVocab {
				assert.Equal(t, int32(tokNormal), types[i])
			}
		}
		assert.Equal(t, "▁", tokens[259])
	}
	tokens, _ := tinyVocab(450)
	assert.Contains(t, tokens, "▁the")
	assert.Contains(t, tokens, "a")
}

// TestTinyNeverEmitsSuppressedTokens runs the model's forward pass (llama:
// RMS norm, RoPE, causal multi-head attention, SwiGLU) in Go over random
// prompts and checks that bytes >= 0x80, <unk>, <s> and </s> always score
// far below the best token, so sampling never picks them.
func TestTinyNeverEmitsSuppressedTokens(t *testing.T) {
	for _, o := range []TinyOptions{{}, {Seed: 2, Layers: 4, Embd: 32, Vocab: 300, Context: 64},
		{Seed: 7, Layers: 2, Embd: 512, Vocab: 600, Context: 16}} {
		o = o.withDefaults()
		m := loadTiny(t, tinyBytes(t, o), o)
		r := rand.New(rand.NewPCG(3, 4))
		for range 4 {
			m.reset()
			for pos := range min(o.Context, 64) {
				logits := m.step(r.IntN(o.Vocab), pos)
				best, worstGap := float32(math.Inf(-1)), float32(math.Inf(1))
				for id, l := range logits {
					if !tinySuppressed(id) {
						best = max(best, l)
					}
				}
				for id, l := range logits {
					if tinySuppressed(id) {
						worstGap = min(worstGap, best-l)
					}
				}
				require.Greater(t, worstGap, float32(100), "position %d", pos)
			}
		}
	}
}

type tinyRef struct {
	o               TinyOptions
	w               map[string][]float32
	keys, values    [][][]float32 // per layer, per position
	embd, heads, hd int
}

func loadTiny(t *testing.T, file []byte, o TinyOptions) *tinyRef {
	path := filepath.Join(t.TempDir(), "m.gguf")
	require.NoError(t, os.WriteFile(path, file, 0o644))
	gf, err := parser.ParseGGUFFile(path)
	require.NoError(t, err)
	m := &tinyRef{o: o, w: map[string][]float32{}, embd: o.Embd, heads: tinyHeads, hd: o.Embd / tinyHeads}
	for _, ti := range gf.TensorInfos {
		start := uint64(gf.TensorDataStartOffset) + ti.Offset
		raw := file[start : start+ti.Bytes()]
		f := make([]float32, len(raw)/4)
		for i := range f {
			f[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
		m.w[ti.Name] = f
	}
	return m
}

func (m *tinyRef) reset() {
	m.keys = make([][][]float32, m.o.Layers)
	m.values = make([][][]float32, m.o.Layers)
}

func rmsNorm(x, g []float32) []float32 {
	var ss float64
	for _, v := range x {
		ss += float64(v) * float64(v)
	}
	s := float32(1 / math.Sqrt(ss/float64(len(x))+1e-5))
	out := make([]float32, len(x))
	for i := range x {
		out[i] = x[i] * s * g[i]
	}
	return out
}

// matVec multiplies a GGML {in, out} matrix (rows of length in) by x.
func matVec(w, x []float32) []float32 {
	out := make([]float32, len(w)/len(x))
	for o := range out {
		var s float32
		for i, v := range x {
			s += w[o*len(x)+i] * v
		}
		out[o] = s
	}
	return out
}

func (m *tinyRef) rope(v []float32, pos int) {
	for h := range m.heads {
		for i := 0; i < m.hd; i += 2 {
			theta := float64(pos) * math.Pow(10000, -float64(i)/float64(m.hd))
			c, s := float32(math.Cos(theta)), float32(math.Sin(theta))
			a, b := v[h*m.hd+i], v[h*m.hd+i+1]
			v[h*m.hd+i], v[h*m.hd+i+1] = a*c-b*s, a*s+b*c
		}
	}
}

func (m *tinyRef) step(token, pos int) []float32 {
	x := append([]float32(nil), m.w["token_embd.weight"][token*m.embd:(token+1)*m.embd]...)
	for l := range m.o.Layers {
		w := func(s string) []float32 { return m.w["blk."+strconv.Itoa(l)+"."+s+".weight"] }
		xn := rmsNorm(x, w("attn_norm"))
		q, k, v := matVec(w("attn_q"), xn), matVec(w("attn_k"), xn), matVec(w("attn_v"), xn)
		m.rope(q, pos)
		m.rope(k, pos)
		m.keys[l], m.values[l] = append(m.keys[l], k), append(m.values[l], v)
		att := make([]float32, m.embd)
		for h := range m.heads {
			hs := h * m.hd
			scores := make([]float64, len(m.keys[l]))
			top := math.Inf(-1)
			for p, kp := range m.keys[l] {
				var d float64
				for i := range m.hd {
					d += float64(q[hs+i] * kp[hs+i])
				}
				scores[p] = d / math.Sqrt(float64(m.hd))
				top = max(top, scores[p])
			}
			var sum float64
			for p := range scores {
				scores[p] = math.Exp(scores[p] - top)
				sum += scores[p]
			}
			for p, vp := range m.values[l] {
				for i := range m.hd {
					att[hs+i] += float32(scores[p]/sum) * vp[hs+i]
				}
			}
		}
		for i, v := range matVec(w("attn_output"), att) {
			x[i] += v
		}
		xn = rmsNorm(x, w("ffn_norm"))
		g, u := matVec(w("ffn_gate"), xn), matVec(w("ffn_up"), xn)
		for i := range g {
			g[i] = g[i] / (1 + float32(math.Exp(float64(-g[i])))) * u[i]
		}
		for i, v := range matVec(w("ffn_down"), g) {
			x[i] += v
		}
	}
	return matVec(m.w["output.weight"], rmsNorm(x, m.w["output_norm.weight"]))
}
