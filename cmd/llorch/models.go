package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/config"
)

func modelsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "models",
		Short: "manage the model catalog: push, list, remove, generate a tiny test model",
	}
	cmd.AddCommand(modelsPushCmd(), modelsLsCmd(), modelsRmCmd(), modelsGenTinyCmd())
	return cmd
}

// apiFlags are the flags the commands that call the API share (`llorch
// models`, `tasks`, `nodes`, `pools`). With a `llorch dev` cluster
// running, its dev.env supplies all of them.
type apiFlags struct {
	home     string
	apiURL   string
	apiToken string
	apiCA    string
	s3       config.S3
}

func (f *apiFlags) add(fs *pflag.FlagSet, withS3 bool) {
	config.AddHomeFlag(fs, &f.home, homeUsage)
	fs.StringVar(&f.apiURL, "api-url", "http://127.0.0.1:8080", "URL of the llorch apiserver")
	config.AddSecret(fs, &f.apiToken, "api-token", "bearer token of the llorch apiserver")
	fs.StringVar(&f.apiCA, "api-ca", "", "PEM CA that signed the apiserver's certificate (an https --api-url with a private CA); empty: the system's roots")
	if withS3 {
		config.AddS3Flags(fs, &f.s3)
	}
}

// client applies env and dev.env defaults and returns the API client.
func (f *apiFlags) client(cmd *cobra.Command) (*apiclient.Client, error) {
	if err := config.Apply(cmd.Flags(), f.home); err != nil {
		return nil, err
	}
	tlsCfg, err := config.ClientTLS("--api-ca", f.apiCA)
	if err != nil {
		return nil, err
	}
	api, err := apiclient.New(f.apiURL, f.apiToken)
	if err != nil {
		return nil, fmt.Errorf("--api-url %w", err) // err starts with the quoted URL
	}
	api.SetTLS(tlsCfg)
	return api, nil
}

// apiHint says where the address of an apiserver that did not answer comes
// from.
func apiHint(err error) error {
	var unreachable *apiclient.UnreachableError
	if errors.As(err, &unreachable) {
		return fmt.Errorf("%w (is it running? set --api-url or LLORCH_API_URL)", err)
	}
	return err
}

// apiContext ends on Ctrl-C or SIGTERM, so an upload stops and cleans
// up (a streamed task is canceled), and after timeout unless it is 0.
func apiContext(cmd *cobra.Command, timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	if timeout == 0 {
		return ctx, stop
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	return ctx, func() { cancel(); stop() }
}
