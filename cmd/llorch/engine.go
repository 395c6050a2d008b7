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

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/engine/lease"
)

// llamaServerShorthands maps llama-server's multi-letter single-dash flags,
// which pflag cannot express, to their long names, so the worker can start
// `llorch engine` with the very arguments it gives llama-server.
var llamaServerShorthands = map[string]string{
	"-np":  "--parallel",
	"-ngl": "--n-gpu-layers",
}

// exitLeaseLapsed is the exit code of an engine whose supervisor lease lapsed.
const exitLeaseLapsed = 75

// engineCmd runs the built-in engine host: llama-server's HTTP API over
// libllama, for CPU nodes, dev and CI (DESIGN decision 7).
func engineCmd() *cobra.Command {
	var (
		o         engine.Options
		logs      logFlags
		ngl       int
		leaseFile string
		leaseTTL  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "engine --model PATH [--host H] [--port N] [-c N] [-np N] [-t N] [-a ALIAS]",
		Short: "serve a GGUF model over llama-server's HTTP API, on the CPU through libllama",
		Long: "Serves /health, /completion, /v1/chat/completions, /props, /slots, /metrics and /v1/models\n" +
			"(with --embeddings, /v1/embeddings instead of the generations)\n" +
			"in llama-server's shapes. The port answers 503 while the model loads. libllama comes from\n" +
			"--lib-dir (env " + engine.LibDirEnv + "), else ./bin/llama, which `just tools` installs.",
		// pflag cannot parse -np or -ngl: RunE rewrites them, then parses.
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			fs := cmd.Flags()
			for i, a := range args {
				if long, ok := llamaServerShorthands[a]; ok {
					args[i] = long
				}
			}
			if err := fs.Parse(args); err != nil {
				if errors.Is(err, pflag.ErrHelp) {
					return cmd.Help()
				}
				return err
			}
			if help, _ := fs.GetBool("help"); help {
				return cmd.Help()
			}
			if fs.NArg() > 0 {
				return fmt.Errorf("unexpected arguments: %v", fs.Args())
			}
			// Env vars only: an engine takes no defaults from a dev cluster's state.
			if err := config.Apply(fs, ""); err != nil {
				return err
			}
			log, err := logs.logger("component", "engine")
			if err != nil {
				return err
			}
			o.Logger = log
			if p, _ := fs.GetString("pooling"); p != "mean" {
				return fmt.Errorf("--pooling %s: the built-in engine pools embeddings by mean only", p)
			}
			if ngl > 0 {
				log.Warn("llorch engine runs on the CPU: --n-gpu-layers is ignored", "n_gpu_layers", ngl)
			}
			srv, err := engine.Start(o)
			if err != nil {
				return err
			}
			defer srv.Close()
			log.Info("engine listening, loading model", "url", srv.URL(), "model", o.ModelPath)

			// A supervised engine outlives a worker restart, not a worker
			// that never returns.
			lapsed := make(<-chan error)
			if leaseFile != "" {
				lctx, stop := context.WithCancel(context.Background())
				defer stop()
				lapsed = lease.Watch(lctx, leaseFile, leaseTTL)
			}
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sigs)
			loaded := make(chan error, 1)
			go func() { loaded <- srv.Load() }()
			select {
			case err := <-loaded:
				if err != nil {
					return err
				}
			case sig := <-sigs:
				// The load cannot be interrupted inside libllama; leave without it.
				log.Info("stopping while loading", "signal", sig.String())
				os.Exit(0)
			case err := <-lapsed:
				log.Warn("stopping while loading", "reason", err.Error())
				os.Exit(exitLeaseLapsed)
			}
			select {
			case sig := <-sigs:
				log.Info("stopping", "signal", sig.String())
				return srv.Close()
			case err := <-lapsed:
				log.Warn("stopping: orphaned", "reason", err.Error())
				_ = srv.Close()
				os.Exit(exitLeaseLapsed)
				return nil
			}
		},
	}
	fs := cmd.Flags()
	fs.StringVarP(&o.ModelPath, "model", "m", "", "GGUF model file")
	fs.StringVar(&o.Host, "host", "127.0.0.1", "address to listen on")
	fs.IntVar(&o.Port, "port", 8080, "port to listen on")
	fs.IntVarP(&o.CtxSize, "ctx-size", "c", 0, "total context in tokens, split across slots (0: the model's trained context)")
	fs.IntVar(&o.Parallel, "parallel", 1, "slots: requests generated at once (-np); more wait")
	fs.IntVarP(&o.Threads, "threads", "t", 0, "CPU threads per decode (0: all CPUs; 1 is fastest for tiny models on shared cores)")
	fs.StringVarP(&o.Alias, "alias", "a", "", "model name reported by the API (default: the file name)")
	fs.Int64Var(&o.Seed, "seed", -1, "default sampling seed of requests that send none (-1: random)")
	fs.StringVar(&o.LibDir, "lib-dir", "", "directory with libllama.so and libggml*.so (default ./bin/llama)")
	fs.BoolVar(&o.Embeddings, "embeddings", false, "serve /v1/embeddings (mean-pooled, L2-normalized) instead of generations, as llama-server --embeddings --pooling mean")
	fs.String("pooling", "mean", "accepted for llama-server compatibility: mean only (the pooling of --embeddings)")
	fs.IntVar(&ngl, "n-gpu-layers", 0, "accepted for llama-server compatibility (-ngl); ignored: CPU only")
	fs.Bool("metrics", true, "accepted for llama-server compatibility; /metrics is always on")
	fs.Bool("no-ui", true, "accepted for llama-server compatibility; there is no UI")
	fs.StringVar(&leaseFile, "supervisor-lease", "", "llorch: exit when this file's mtime is older than --supervisor-timeout (the worker renews it)")
	fs.DurationVar(&leaseTTL, "supervisor-timeout", time.Minute, "llorch: how long the engine runs without its supervisor")
	logs.addFlags(fs)
	fs.BoolP("help", "h", false, "help for engine")
	// llama-server's own flags and those the worker sets take no env var.
	config.BindEnv(fs, map[string]string{"lib-dir": engine.LibDirEnv},
		"model", "host", "port", "ctx-size", "parallel", "threads", "alias", "seed",
		"n-gpu-layers", "metrics", "no-ui", "embeddings", "pooling", "help", "supervisor-lease", "supervisor-timeout")
	return cmd
}
