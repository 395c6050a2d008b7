package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/config"
)

// codecServerCmd serves Temporal's codec-server protocol with llorch's
// payload codec, so the Temporal UI and the temporal CLI show decrypted
// payloads to an operator who holds the codec server's token.
func codecServerCmd() *cobra.Command {
	var (
		home, addr, keys, token string
		origins                 []string
		logs                    logFlags
	)
	cmd := &cobra.Command{
		Use:   "codec-server [--addr HOST:PORT] [--ui-origin URL]",
		Short: "decode llorch's encrypted Temporal payloads for the Temporal UI and CLI",
		Long: "Serves POST /encode and /decode (Temporal's codec-server protocol) with the keys of\n" +
			codec.EnvKeys + " (or the file " + codec.EnvKeys + "_FILE names; a `llorch dev` cluster's dev.env), behind the\n" +
			"bearer token " + codec.EnvServerToken + " (or its _FILE; never a flag). See docs/security.md.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := config.Apply(cmd.Flags(), home); err != nil {
				return err
			}
			for _, o := range origins {
				// An origin is scheme://host[:port]; anything else would never
				// match a browser's Origin header, so CORS would silently fail.
				if u, err := url.Parse(o); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
					strings.TrimSuffix(u.Path, "/") != "" || u.RawQuery != "" || u.User != nil {
					return fmt.Errorf("--ui-origin %q: want an origin, scheme://host[:port] (e.g. http://localhost:8233)", o)
				}
			}
			log, err := logs.logger("component", "codec-server")
			if err != nil {
				return err
			}
			if keys == "" {
				return fmt.Errorf("no codec keys: set %s or %s (the keys the cluster encrypts with)", codec.EnvKeys, codec.EnvKeys+config.FileSuffix)
			}
			c, err := codec.Parse(keys)
			if err != nil {
				return fmt.Errorf("%s: %w", codec.EnvKeys, err)
			}
			if token == "" {
				return fmt.Errorf("no token: set %s or %s; whoever holds it reads every prompt and output in Temporal", codec.EnvServerToken, codec.EnvServerToken+config.FileSuffix)
			}
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("--addr %s: %w", addr, err)
			}
			if !bearer.Loopback(addr) {
				log.Warn("codec server on a non-loopback address: put TLS in front of it (bearer tokens and payloads travel in clear)", "addr", addr)
			}
			srv := &http.Server{Handler: codec.Handler(c, codec.ServerOptions{Token: token, UIOrigins: origins}),
				ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute}
			log.Info("codec server listening", "url", "http://"+ln.Addr().String(), "key_ids", c.KeyIDs(),
				"ui_origins", origins, "token", bearer.Fingerprint(token))
			done := make(chan error, 1)
			go func() { done <- srv.Serve(ln) }()
			select {
			case sig := <-stopSignals:
				log.Info("stopping", "signal", sig.String())
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				return srv.Shutdown(ctx)
			case err := <-done:
				if errors.Is(err, http.ErrServerClosed) {
					return nil
				}
				return err
			}
		},
	}
	fs := cmd.Flags()
	config.AddHomeFlag(fs, &home, homeUsage)
	logs.addFlags(fs)
	fs.StringVar(&addr, "addr", "127.0.0.1:8234", "listen address (loopback by default: the decoded payloads are every prompt and output)")
	fs.StringSliceVar(&origins, "ui-origin", nil, "origin of a Temporal UI allowed to call from the browser (CORS), e.g. http://localhost:8233; repeatable")
	config.AddSecret(fs, &keys, "codec-keys", "payload codec keys, id:base64key,… (the cluster's)")
	config.AddSecret(fs, &token, "codec-server-token", "bearer token the Temporal UI and CLI present")
	config.BindEnv(fs, map[string]string{"addr": "LLORCH_CODEC_ADDR", "ui-origin": "LLORCH_CODEC_UI_ORIGIN"})
	return cmd
}
