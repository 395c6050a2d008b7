package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/model"
)

func modelsRmCmd() *cobra.Command {
	var f apiFlags
	cmd := &cobra.Command{
		Use:   "rm ID",
		Short: "remove a model from the catalog",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			if err := model.ValidateID(id); err != nil {
				return err
			}
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := apiContext(cmd, 60*time.Second)
			defer cancel()
			err = api.DeleteModel(ctx, id)
			if apiclient.IsNotFound(err) {
				return fmt.Errorf("model %s not found", id)
			}
			if err != nil {
				return apiHint(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed model %s from the catalog\n", id)
			return nil
		},
	}
	f.add(cmd.Flags(), false)
	config.BindEnv(cmd.Flags(), nil)
	return cmd
}
