package main

import (
	"bytes"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/model"
)

func modelsLsCmd() *cobra.Command {
	var (
		f      apiFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "ls [--json]",
		Short: "list the models in the catalog",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := apiContext(cmd, 30*time.Second)
			defer cancel()
			list, err := api.ListModels(ctx)
			if err != nil {
				return apiHint(err)
			}
			if asJSON {
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s\n", bytes.TrimRight(list.Raw, "\n"))
				return err
			}
			return printModelTable(cmd.OutOrStdout(), list.Models)
		},
	}
	f.add(cmd.Flags(), false)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's JSON instead of a table")
	config.BindEnv(cmd.Flags(), nil, "json")
	return cmd
}

func printModelTable(w io.Writer, models []model.Entry) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tLIFECYCLE\tSIZE\tSHA256\tARCH\tPARAMS\tCREATED")
	for _, e := range models {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.ID, modelsDash(string(e.Lifecycle)), modelsBytes(e.Size),
			modelsDash(e.SHA256[:min(12, len(e.SHA256))]), modelsDash(e.Metadata.Architecture),
			modelsParams(e.Metadata.Parameters), modelsTime(e.CreatedAt))
	}
	return tw.Flush()
}
