package prefix

import (
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

func TestNextTurnHoldsTheLastOnesChain(t *testing.T) {
	sys := task.Message{Role: "system", Content: "be brief"}
	turn1 := task.Request{Messages: []task.Message{sys, {Role: "user", Content: "hello"}}}
	held := Hashes(After(turn1, "hi there"))
	slices.Sort(held)

	turn2 := task.Request{Messages: append(slices.Clone(turn1.Messages),
		task.Message{Role: "assistant", Content: "hi there"}, task.Message{Role: "user", Content: "and then?"})}
	chain := Of(turn2)
	require.Len(t, chain, 4)
	require.Equal(t, chain[2].End, Held(chain, held), "system, user and the reply are held")

	// Another session with the same system prompt shares its first link.
	other := Of(task.Request{Messages: []task.Message{sys, {Role: "user", Content: "different"}}})
	require.Equal(t, len("system")+len("be brief"), Held(other, held))

	// A reply the client changed breaks the chain after it.
	edited := slices.Clone(turn2.Messages)
	edited[2].Content = "hi there!"
	require.Equal(t, chain[1].End, Held(Of(task.Request{Messages: edited}), held))

	// Text and chat chains never meet, even on equal bytes.
	require.Zero(t, Held(Text("systembe brief"), held))
}

func TestTextChainsWholeBlocks(t *testing.T) {
	s := strings.Repeat("a", 3*BlockBytes+10)
	c := Text(s)
	require.Len(t, c, 3, "the partial last block is not a link")
	require.Equal(t, 3*BlockBytes, c[2].End)
	held := Hashes(Text(s[:2*BlockBytes] + strings.Repeat("b", BlockBytes)))
	slices.Sort(held)
	require.Equal(t, 2*BlockBytes, Held(c, held), "the chain holds up to where the texts part")
	require.Len(t, Text(strings.Repeat("x", (MaxLinks+5)*BlockBytes)), MaxLinks)
	require.Empty(t, Text("short"))
	for _, l := range c {
		require.Less(t, l.Hash, uint64(1<<53), "exact in JSON")
	}
}
