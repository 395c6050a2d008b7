package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/fx"

	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/controlplane"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/scheduler"
)

func apiserverCmd() *cobra.Command {
	var f apiserverFlags
	cmd := &cobra.Command{
		Use:   "apiserver",
		Short: "serve the REST API and run the control worker (all workflows)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), f.home); err != nil {
				return err
			}
			return runAPIServer(&f)
		},
	}
	f.addFlags(cmd.Flags())
	config.BindEnv(cmd.Flags(), map[string]string{"addr": "LLORCH_API_ADDR"})
	return cmd
}

// apiserverFlags are the settings of `llorch apiserver`.
type apiserverFlags struct {
	common
	api                apiserver.Config
	canAfter, queueCap int
	policy, linkToken  string
	autoPools          scheduler.AutoPools // Pools and Nodes set when --auto-pools
	autoPoolsOn        bool
	s3                 config.S3
	auditLog           string
	tls                config.ServerTLS
	linkCA             string
	outputRetention    time.Duration
	fastStart          bool
}

func (f *apiserverFlags) addFlags(fs *pflag.FlagSet) {
	f.common.addFlags(fs)
	fs.StringVar(&f.api.Addr, "addr", "127.0.0.1:8080", "REST API listen address")
	fs.StringVar(&f.api.AdvertiseURL, "advertise-url", "", "URL nodes push token streams to (default http://<addr>)")
	fs.BoolVar(&f.autoPoolsOn, "auto-pools", false, "a task for a model no pool serves starts a pool for it (else 503 POOL_UNAVAILABLE)")
	fs.IntVar(&f.autoPools.Slots, "auto-pool-slots", 2, "slots of a pool started for a task")
	fs.IntVar(&f.autoPools.Ctx, "auto-pool-ctx", 0, "context of a pool started for a task (0: the model's)")
	fs.IntVar(&f.queueCap, "queue-capacity", 1024, "tasks that may wait per priority (interactive, batch); more get 429 ADMISSION_REJECT")
	fs.StringVar(&f.policy, "admission-policy", scheduler.Reject, "when a queue is full: reject (429 ADMISSION_REJECT) or drop-lru (fail the longest-waiting task instead)")
	config.AddSecret(fs, &f.linkToken, "link-token", "cluster secret presented to the node links the scheduler follows (the workers' LLORCH_LINK_TOKEN)")
	config.AddSecret(fs, &f.api.Token, "api-token", "bearer token every /v2 call must present; required to bind a non-loopback address")
	config.AddServerTLSFlags(fs, &f.tls, "tls", "the REST API")
	fs.StringVar(&f.linkCA, "link-ca", "", "PEM CA that signed the node links' certificates (the workers' --link-tls-cert); empty: the system's roots")
	fs.IntVar(&f.canAfter, "node-continue-as-new-events", 0, "continue node workflows as new after this many history events (0: when Temporal suggests)")
	fs.StringVar(&f.auditLog, "audit-log", "", "also append the audit trail (JSON lines, stream=audit; always on stderr) to this file")
	fs.DurationVar(&f.outputRetention, "output-retention", 7*24*time.Hour,
		"delete task outputs stored in the bucket (outputs/, those above the workers' --max-inline-output) this long after they were written (0: keep them)")
	fs.BoolVar(&f.fastStart, "fast-start", true,
		"send an admitted task's generation over the node link to its slot's node while its workflow starts (false: the node waits for the workflow's Generate activity)")
	config.AddS3Flags(fs, &f.s3)
}

// auditWriter is where the audit trail goes: JSON lines on stderr, where
// the stream=audit attribute sets them apart, and appended to --audit-log
// when set (replicas may share the file: O_APPEND writes of one line each).
func (f *apiserverFlags) auditWriter() (io.Writer, func(), error) {
	if f.auditLog == "" {
		return os.Stderr, func() {}, nil
	}
	file, err := os.OpenFile(f.auditLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("--audit-log: %w", err)
	}
	return io.MultiWriter(os.Stderr, file), func() { _ = file.Close() }, nil
}

// runAPIServer serves the REST API and runs the control worker until
// SIGINT or SIGTERM; controlplane wires the process.
func runAPIServer(f *apiserverFlags) error {
	log, err := f.logger("component", "apiserver", "machine_id", hostname())
	if err != nil {
		return err
	}
	if f.api.TLS, err = f.tls.Config(); err != nil {
		return err
	}
	if f.api.TLS == nil && !bearer.Loopback(f.api.Addr) {
		log.Warn("the REST API serves plain HTTP on a non-loopback address: tokens and prompts cross the network in clear "+
			"unless a TLS-terminating proxy is in front (else set --tls-cert and --tls-key)", "addr", f.api.Addr)
	}
	if f.policy != scheduler.Reject && f.policy != scheduler.DropLRU {
		return fmt.Errorf("--admission-policy: want %s or %s, got %q", scheduler.Reject, scheduler.DropLRU, f.policy)
	}
	if f.outputRetention < 0 {
		return fmt.Errorf("--output-retention %s: want 0 (keep outputs) or a positive duration", f.outputRetention)
	}
	linkTLS, err := config.ClientTLS("--link-ca", f.linkCA)
	if err != nil {
		return err
	}
	identity := clientIdentity("apiserver", "", hostname(), os.Getpid())
	tc, err := f.dial(log, identity)
	if err != nil {
		return err
	}
	defer tc.Close()
	store, err := openStore(f.s3, log)
	if err != nil {
		return err
	}
	audit, closeAudit, err := f.auditWriter()
	if err != nil {
		return err
	}
	defer closeAudit()
	var auto *scheduler.AutoPools
	if f.autoPoolsOn {
		auto = &f.autoPools
	}
	plane, err := controlplane.New(controlplane.Config{
		Temporal: tc, DataConverter: f.dc, Namespace: f.temporal.Namespace, Identity: identity,
		Store: store, API: f.api, Logger: log, Registry: newRegistry(), Audit: audit, MachineID: hostname(),
		QueueCapacity: f.queueCap, Policy: f.policy, AutoPools: auto, OutputRetention: f.outputRetention,
		LinkToken: f.linkToken, LinkHTTP: config.WithClientTLS(link.DefaultHTTP, linkTLS),
		NodeContinueAsNewEvents: f.canAfter, FastStart: f.fastStart,
	})
	if err != nil {
		return err
	}
	return runApp(log, f.pprof(log), fx.Invoke(func(lc fx.Lifecycle) {
		lc.Append(fx.Hook{OnStart: plane.Start, OnStop: plane.Stop})
	}))
}
