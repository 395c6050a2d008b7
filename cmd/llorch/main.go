// Command llorch runs every part of llorch: the apiserver with the control
// worker, the node agent, and a whole local cluster (`llorch dev`).
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	signal.Notify(stopSignals, syscall.SIGINT, syscall.SIGTERM)
	if err := rootCmd().Execute(); err != nil {
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
	root.AddCommand(apiserverCmd(), workerCmd(), devCmd(), modelsCmd(), engineCmd(), simCmd(), codecServerCmd(), versionCmd())
	return root
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "print the llorch version",
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), version()) },
	}
}
