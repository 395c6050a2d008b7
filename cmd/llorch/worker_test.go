package main

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

// A node link on a public address without a token is refused before the
// worker does anything else.
func TestWorkerRefusesOpenPublicLink(t *testing.T) {
	t.Setenv("LLORCH_LINK_TOKEN", "")
	cmd := workerCmd()
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	cmd.SetArgs([]string{"--node-id", "n1", "--home", t.TempDir(), "--link-addr", "0.0.0.0:7300"})
	err := cmd.Execute()
	require.ErrorContains(t, err, "--link-addr 0.0.0.0:7300")
	require.ErrorContains(t, err, "--link-token")
}
