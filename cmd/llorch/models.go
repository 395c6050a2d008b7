package main

import "github.com/spf13/cobra"

func modelsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "models",
		Short: "manage the model catalog: push, list, remove, generate a tiny test model",
	}
	cmd.AddCommand(modelsPushCmd(), modelsLsCmd(), modelsRmCmd(), modelsGenTinyCmd())
	return cmd
}
