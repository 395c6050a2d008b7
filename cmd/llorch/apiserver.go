package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"
	"go.uber.org/fx"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/modelclient"
	"github.com/llorch/llorch/nodeclient"
	"github.com/llorch/llorch/poolclient"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
	"github.com/llorch/llorch/workers/agent"
)

func apiserverCmd() *cobra.Command {
	var c common
	var api apiserver.Config
	var canAfter, queueCap int
	var policy string
	var s3 config.S3
	cmd := &cobra.Command{
		Use:   "apiserver",
		Short: "serve the REST API and run the control worker (all workflows)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), c.home); err != nil {
				return err
			}
			log, err := c.logger("component", "apiserver", "machine_id", hostname())
			if err != nil {
				return err
			}
			tc, err := c.dial(log, agent.ClientIdentity("apiserver", "", hostname(), os.Getpid()))
			if err != nil {
				return err
			}
			defer tc.Close()
			reg := newRegistry()
			nodes := &nodeclient.Client{Temporal: tc, Namespace: c.temporal.Namespace, ContinueAsNewAfterEvents: canAfter,
				Via: "rest", Metrics: nodeclient.NewMetrics(reg)}
			store, err := openStore(s3, log)
			if err != nil {
				return err
			}
			hub := &tokenstream.Hub{}
			if policy != scheduler.Reject && policy != scheduler.DropLRU {
				return fmt.Errorf("--admission-policy: want %s or %s, got %q", scheduler.Reject, scheduler.DropLRU, policy)
			}
			sched := &scheduler.Scheduler{Capacity: queueCap, Policy: policy, Log: log, Metrics: scheduler.NewMetrics(reg)}
			srv, err := apiserver.New(api, apiserver.Deps{
				Nodes: nodes, Store: store, Registry: reg, Logger: log, Scheduler: sched, Hub: hub,
				Models: &modelclient.Client{Temporal: tc, Namespace: c.temporal.Namespace, Nodes: nodes},
				Pools:  &poolclient.Client{Temporal: tc, Namespace: c.temporal.Namespace},
			})
			if err != nil {
				return err
			}
			sched.Source = srv.Candidates
			schedCtx, stopSched := context.WithCancel(context.Background())
			defer stopSched()
			return runApp(log, c.pprof(log),
				fx.Supply(log, &activities.CatalogActivities{Store: store}, fx.Annotate(tc, fx.As(new(client.Client))),
					&scheduler.TaskControl{S: sched, Hub: hub, Metrics: sched.Metrics}),
				workers.ControlModule,
				fx.Invoke(func(lc fx.Lifecycle) {
					lc.Append(fx.Hook{
						OnStart: func(context.Context) error { go sched.Run(schedCtx); return nil },
						OnStop:  func(context.Context) error { stopSched(); return nil },
					})
				}),
				fx.Invoke(func(lc fx.Lifecycle) {
					lc.Append(fx.Hook{
						OnStart: func(ctx context.Context) error {
							apiserver.EnsureSearchAttributes(ctx, tc, c.temporal.Namespace, log)
							return srv.Listen(api.Addr)
						},
						OnStop: srv.Shutdown,
					})
				}),
			)
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	fs.StringVar(&api.Addr, "addr", "127.0.0.1:8080", "REST API listen address")
	config.Env(fs, "addr", "LLORCH_API_ADDR")
	fs.StringVar(&api.AdvertiseURL, "advertise-url", "", "URL nodes push token streams to (default http://<addr>)")
	config.Env(fs, "advertise-url", "LLORCH_ADVERTISE_URL")
	fs.BoolVar(&api.AutoPools, "auto-pools", false, "a task for a model no pool serves starts a pool for it (else 503 POOL_UNAVAILABLE)")
	config.Env(fs, "auto-pools", "LLORCH_AUTO_POOLS")
	fs.IntVar(&api.AutoPoolSlots, "auto-pool-slots", 2, "slots of a pool started for a task")
	config.Env(fs, "auto-pool-slots", "LLORCH_AUTO_POOL_SLOTS")
	fs.IntVar(&api.AutoPoolCtx, "auto-pool-ctx", 0, "context of a pool started for a task (0: the model's)")
	config.Env(fs, "auto-pool-ctx", "LLORCH_AUTO_POOL_CTX")
	fs.IntVar(&queueCap, "queue-capacity", 1024, "tasks that may wait per priority (interactive, batch); more get 429 ADMISSION_REJECT")
	config.Env(fs, "queue-capacity", "LLORCH_QUEUE_CAPACITY")
	fs.StringVar(&policy, "admission-policy", scheduler.Reject, "when a queue is full: reject (429 ADMISSION_REJECT) or drop-lru (fail the longest-waiting task instead)")
	config.Env(fs, "admission-policy", "LLORCH_ADMISSION_POLICY")
	fs.StringVar(&api.Token, "api-token", "", "bearer token every /v2 call must present; required to bind a non-loopback address")
	config.Env(fs, "api-token", "LLORCH_API_TOKEN")
	fs.IntVar(&canAfter, "node-continue-as-new-events", 0, "continue node workflows as new after this many history events (0: when Temporal suggests)")
	config.Env(fs, "node-continue-as-new-events", "LLORCH_NODE_CONTINUE_AS_NEW_EVENTS")
	config.AddS3Flags(fs, &s3)
	return cmd
}
