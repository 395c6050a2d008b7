// Command llorch runs every part of llorch: the apiserver with the control
// worker, the node agent, and a whole local cluster (`llorch dev`).
package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/config"
)

func main() {
	signal.Notify(stopSignals, syscall.SIGINT, syscall.SIGTERM)
	if err := rootCmd().Execute(); err != nil {
		if errors.Is(err, errInterrupted) {
			os.Exit(130) // as a shell reports Ctrl-C
		}
		fmt.Fprintln(os.Stderr, "llorch:", err)
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "llorch",
		Short:         "llama.cpp inference across many GPU machines, on Temporal",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(apiserverCmd(), workerCmd(), devCmd(), modelsCmd(), tasksCmd(), nodesCmd(), poolsCmd(), engineCmd(), simCmd(),
		codecServerCmd(), versionCmd())
	describeSecrets(root)
	return root
}

// describeSecrets lists each command's secrets in its --help: they are no
// flags (config.AddSecret), so cobra's flag list leaves them out.
func describeSecrets(c *cobra.Command) {
	if secrets := config.Secrets(c.LocalNonPersistentFlags()); len(secrets) > 0 {
		var b strings.Builder
		if c.Long == "" {
			b.WriteString(c.Short)
		} else {
			b.WriteString(c.Long)
		}
		b.WriteString("\n\nSecrets (from the environment, or a file the _FILE variable names; never flags):\n")
		for _, s := range secrets {
			fmt.Fprintf(&b, "  %-26s %s\n", s.Env, s.Usage)
		}
		c.Long = strings.TrimRight(b.String(), "\n")
	}
	for _, sub := range c.Commands() {
		describeSecrets(sub)
	}
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "print the llorch version",
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), version()) },
	}
}
