package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/modelstore"
)

// modelsGenTinyCmd writes a tiny llama model with random weights: a real
// GGUF that llama.cpp loads in well under a second, for tests and demos on
// machines that cannot download a model.
func modelsGenTinyCmd() *cobra.Command {
	var (
		out string
		o   modelstore.TinyOptions
	)
	cmd := &cobra.Command{
		Use:   "gen-tiny --out FILE",
		Short: "write a tiny llama GGUF model with random weights (about 0.5 MB)",
		Long: "Writes a GGUF v3 llama model with random F32 weights that llama.cpp loads. Its output is\n" +
			"gibberish but always valid UTF-8, and it never emits end-of-text, so generation runs to its\n" +
			"token limit. The same flags always give the same bytes. Prints the path, size and sha256.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			// TinyOptions reads 0 as "default": refuse it here instead.
			for name, v := range map[string]int{"layers": o.Layers, "embd": o.Embd, "vocab": o.Vocab, "context": o.Context} {
				if v <= 0 {
					return fmt.Errorf("--%s must be positive, not %d", name, v)
				}
			}
			if err := modelstore.WriteTinyFile(out, o); err != nil {
				return err
			}
			f, err := os.Open(out)
			if err != nil {
				return err
			}
			defer f.Close()
			h := sha256.New()
			size, err := io.Copy(h, f)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "path:   %s\nsize:   %d\nsha256: %s\n", out, size, hex.EncodeToString(h.Sum(nil)))
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&out, "out", "", "file to write (through FILE.tmp, then renamed)")
	fs.IntVar(&o.Layers, "layers", 2, "transformer blocks (1-64)")
	fs.IntVar(&o.Embd, "embd", 64, "embedding width (a multiple of 8, 4 heads)")
	fs.IntVar(&o.Vocab, "vocab", 450, "vocabulary size (at least 260: 3 special and 256 byte tokens come first)")
	fs.IntVar(&o.Context, "context", 256, "trained context length in tokens (at least 16)")
	fs.Int64Var(&o.Seed, "seed", 1, "seed of the random weights (0 means 1)")
	fs.StringVar(&o.Name, "name", "llorch-tiny", "general.name written in the file")
	return cmd
}
