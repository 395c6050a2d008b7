package main

import (
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/stretchr/testify/require"
)

// A node link on a public address without a token is refused before the
// worker does anything else.
func TestWorkerRefusesOpenPublicLink(t *testing.T) {
	t.Setenv("LLORCH_LINK_TOKEN", "")
	err := execute(workerCmd(), "--node-id", "n1", "--home", t.TempDir(), "--link-addr", "0.0.0.0:7300")
	require.ErrorContains(t, err, "--link-addr 0.0.0.0:7300")
	require.ErrorContains(t, err, "LLORCH_LINK_TOKEN")
}

// Every secret given the old way, as a flag, stops the command before it
// does anything, naming the env var to use; the secret is not repeated.
func TestSecretFlagsRefused(t *testing.T) {
	for _, tc := range []struct {
		cmd  func() *cobra.Command
		flag string
		env  string
		args []string
	}{
		{apiserverCmd, "--api-token", "LLORCH_API_TOKEN", nil},
		{apiserverCmd, "--link-token", "LLORCH_LINK_TOKEN", nil},
		{apiserverCmd, "--s3-secret-key", "LLORCH_S3_SECRET_KEY", nil},
		{apiserverCmd, "--s3-access-key", "LLORCH_S3_ACCESS_KEY", nil},
		{apiserverCmd, "--temporal-api-key", "LLORCH_TEMPORAL_API_KEY", nil},
		{workerCmd, "--link-token", "LLORCH_LINK_TOKEN", nil},
		{workerCmd, "--s3-secret-key", "LLORCH_S3_SECRET_KEY", nil},
		{simNodesCmd, "--link-token", "LLORCH_LINK_TOKEN", nil},
		{modelsLsCmd, "--api-token", "LLORCH_API_TOKEN", nil},
		{modelsRmCmd, "--api-token", "LLORCH_API_TOKEN", []string{"tiny"}},
		{modelsPushCmd, "--s3-secret-key", "LLORCH_S3_SECRET_KEY", []string{"tiny.gguf"}},
	} {
		err := execute(tc.cmd(), append([]string{"--home", t.TempDir(), tc.flag, "s3cr3t-value"}, tc.args...)...)
		require.ErrorContains(t, err, tc.flag+": secrets are not taken from the command line", tc.flag)
		require.ErrorContains(t, err, "set "+tc.env+", or "+tc.env+"_FILE", tc.flag)
		require.NotContains(t, err.Error(), "s3cr3t-value")
	}
}

func execute(cmd *cobra.Command, args ...string) error {
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	cmd.SetArgs(args)
	return cmd.Execute()
}

// Values that could only be ignored are refused before anything starts.
func TestNonsenseValuesRefused(t *testing.T) {
	home := t.TempDir()
	require.ErrorContains(t, execute(apiserverCmd(), "--home", home, "--output-retention", "-1h"), "--output-retention -1h0m0s")
	t.Setenv("LLORCH_CODEC_KEYS", "k1:"+strings.Repeat("A", 43)+"=")
	t.Setenv("LLORCH_CODEC_SERVER_TOKEN", "t")
	for _, o := range []string{"localhost:8233", "http://", "ftp://ui", "http://ui/path", "http://ui?x=1", "http://u@ui"} {
		require.ErrorContains(t, execute(codecServerCmd(), "--home", home, "--ui-origin", o), "--ui-origin", o)
	}
}
