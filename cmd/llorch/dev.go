package main

import (
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/devcluster"
)

func devCmd() *cobra.Command {
	var cfg devcluster.Config
	own := pflag.NewFlagSet("dev", pflag.ContinueOnError) // the flags with an env var
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "run the whole system on this machine: Temporal, S3, the apiserver (or N behind a balancer) and one worker",
		Long: "Runs Temporal (dev server), S3 (versitygw), the apiserver and a worker for one local node as\n" +
			"children of this process, prints the URLs and the API token, and stops them all on Ctrl-C.\n" +
			"State (Temporal database, S3 data, secrets) lives in --home and survives restarts; its dev.env\n" +
			"lets `llorch worker --node-id node-2` in another terminal join this cluster. With --apiservers N\n" +
			"N apiservers run behind a round-robin balancer on the API port; kill -9 of one is survived\n" +
			"(the others serve, and it is restarted).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(own, cfg.Home); err != nil {
				return err
			}
			if err := devcluster.ValidateAPIServers(cfg.APIServers); err != nil {
				return err
			}
			signal.Stop(stopSignals) // dev handles its signals itself, below
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			go func() {
				// After the first signal, restore the default action: a
				// second Ctrl-C kills llorch dev at once, and the children
				// follow it through their parent-death signal.
				<-ctx.Done()
				stop()
			}()
			return devcluster.Run(ctx, cfg, cmd.OutOrStdout())
		},
	}
	fs := cmd.Flags()
	// Only --apiservers takes an env var: the others are ports and paths of
	// this one machine, where a shell's leftover value would only surprise.
	own.IntVar(&cfg.APIServers, "apiservers", 1, "apiserver replicas; more than 1 run on free loopback ports behind a round-robin balancer on --api-port, and a killed one is restarted")
	config.BindEnv(own, nil)
	fs.AddFlagSet(own)
	config.AddHomeFlag(fs, &cfg.Home, "state dir: dev.env, Temporal database, S3 data, model catalogs")
	fs.StringVar(&cfg.NodeID, "node-id", devcluster.DefaultNodeID(), "id of the local node the dev worker runs")
	fs.StringVar(&cfg.TemporalBin, "temporal-bin", "", "Temporal CLI binary (default ./bin/temporal, else temporal on PATH)")
	fs.StringVar(&cfg.VersitygwBin, "versitygw-bin", "", "versitygw binary (default ./bin/versitygw, else versitygw on PATH)")
	fs.StringVar(&cfg.Bucket, "bucket", devcluster.DefaultBucket, "S3 bucket for models, created if missing")
	fs.IntVar(&cfg.TemporalPort, "temporal-port", devcluster.DefaultTemporalPort, "Temporal gRPC port")
	fs.IntVar(&cfg.UIPort, "ui-port", devcluster.DefaultUIPort, "Temporal UI port")
	fs.IntVar(&cfg.S3Port, "s3-port", devcluster.DefaultS3Port, "S3 port")
	fs.IntVar(&cfg.APIPort, "api-port", devcluster.DefaultAPIPort, "REST API port (also serves the apiserver /metrics)")
	fs.IntVar(&cfg.WorkerMetricsPort, "worker-metrics-port", devcluster.DefaultWorkerMetricsPort, "port of the dev worker's /metrics and /health")
	fs.DurationVar(&cfg.ReadyTimeout, "ready-timeout", 60*time.Second, "how long each part may take to start")
	fs.DurationVar(&cfg.StopGrace, "stop-grace", 10*time.Second, "how long each part may take to stop after SIGTERM before it is killed")
	return cmd
}
