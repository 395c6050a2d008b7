// Package prefix names the prefixes of prompts by chained hashes. A node
// publishes the hashes its engines' slot caches hold; placement hashes a
// task's prompt the same way and finds the pool holding its longest
// prefix, without any prompt text leaving the node or the apiserver.
//
// A chat prompt is a chain of messages: the next turn of a session repeats
// the history (and the reply) and adds to it, and sessions that share a
// system prompt share its first link. A text prompt is a chain of
// BlockBytes blocks. Each link's hash covers everything before it, so a
// held hash means the whole prefix up to it is held.
package prefix

import (
	"encoding/binary"
	"hash/fnv"
	"slices"

	"github.com/llorch/llorch/task"
)

// Link is one step of a prompt's chain: the hash of the prompt up to and
// including it, and where it ends in bytes of the prompt's content (what a
// cache holding it saves).
type Link struct {
	Hash uint64 `json:"h"`
	End  int    `json:"e"`
}

const (
	// BlockBytes is a text prompt's link size: about 64 tokens of a
	// typical tokenizer, so a shared system prompt spans several.
	BlockBytes = 256
	// MaxLinks bounds a chain: a prefix longer than that is matched on
	// its first MaxLinks links (still the pool that holds the most).
	MaxLinks = 64
	// hashMask keeps hashes within 53 bits: exact in every JSON reader.
	hashMask = 1<<53 - 1
)

// Kinds seed the chains, so a text prompt never matches a chat one.
const (
	seedText uint64 = 0x7465787400000000
	seedChat uint64 = 0x6368617400000000
)

func next(prev uint64, parts ...string) uint64 {
	h := fnv.New64a()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], prev)
	h.Write(b[:])
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return h.Sum64() & hashMask
}

// Text is the chain of a text prompt: its whole blocks (a partial last one
// is not a prefix the next prompt shares).
func Text(s string) []Link {
	var out []Link
	h := seedText
	for end := BlockBytes; end <= len(s) && len(out) < MaxLinks; end += BlockBytes {
		h = next(h, s[end-BlockBytes:end])
		out = append(out, Link{Hash: h, End: end})
	}
	return out
}

// Messages is the chain of a chat prompt: one link per message.
func Messages(msgs []task.Message) []Link {
	out := make([]Link, 0, min(len(msgs), MaxLinks))
	h, end := seedChat, 0
	for _, m := range msgs[:min(len(msgs), MaxLinks)] {
		h = next(h, m.Role, m.Content)
		end += len(m.Role) + len(m.Content)
		out = append(out, Link{Hash: h, End: end})
	}
	return out
}

// Of is the chain of a task's prompt: its messages', else its text's.
func Of(r task.Request) []Link {
	if len(r.Messages) > 0 {
		return Messages(r.Messages)
	}
	return Text(r.Prompt)
}

// After is the chain a slot's cache holds once the task's generation
// produced output: a chat turn's reply is the next turn's assistant
// message; a text prompt goes on with the output.
func After(r task.Request, output string) []Link {
	if len(r.Messages) > 0 {
		return Messages(append(slices.Clip(r.Messages), task.Message{Role: "assistant", Content: output}))
	}
	return Text(r.Prompt + output)
}

// Hashes are a chain's hashes.
func Hashes(chain []Link) []uint64 {
	out := make([]uint64, len(chain))
	for i, l := range chain {
		out[i] = l.Hash
	}
	return out
}

// Held is the bytes of chain's longest prefix whose hash is in held (sorted
// ascending, as a node publishes it); 0 when none is.
func Held(chain []Link, held []uint64) int {
	for i := len(chain) - 1; i >= 0; i-- {
		if _, ok := slices.BinarySearch(held, chain[i].Hash); ok {
			return chain[i].End
		}
	}
	return 0
}

// Shared is how many links two chains share from the start.
func Shared(a, b []uint64) int {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}
