package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/config"
)

// The resource commands (`llorch nodes`, `pools`, `tasks`) call the API
// once each and print its answer: a table or key: value lines, or with
// --json the API's JSON as it came.

// apiCall is one command's request: its method, path and body (nil: none)
// from its arguments.
type apiCall func(args []string) (method, path string, body any, err error)

// apiView prints an answer that is not --json.
type apiView func(w io.Writer, v map[string]any) error

// resourceCmd is a command that makes call and prints the answer with
// view; flags adds its own flags.
func resourceCmd(use, short string, args cobra.PositionalArgs, call apiCall, view apiView, flags func(cmd *cobra.Command)) *cobra.Command {
	var (
		f      apiFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			method, path, body, err := call(args)
			if err != nil {
				return err
			}
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := apiContext(cmd, time.Minute)
			defer cancel()
			raw, err := api.Call(ctx, method, path, body)
			if err != nil {
				return apiHint(err)
			}
			return printAnswer(cmd.OutOrStdout(), raw, asJSON, view)
		},
	}
	f.add(cmd.Flags(), false)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's JSON instead of a table")
	if flags != nil {
		flags(cmd)
	}
	bindAPIEnv(cmd.Flags())
	return cmd
}

// bindAPIEnv gives the shared API flags their env vars (LLORCH_API_URL,
// LLORCH_API_CA) and a command's own flags none: a variable set for
// another command (LLORCH_ENGINE, LLORCH_MODEL) must not steer this one.
func bindAPIEnv(fs *pflag.FlagSet) {
	var own []string
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Name != "api-url" && f.Name != "api-ca" && f.Name != "home" && config.SecretEnv(f) == "" {
			own = append(own, f.Name)
		}
	})
	config.BindEnv(fs, nil, own...)
}

func printAnswer(w io.Writer, raw []byte, asJSON bool, view apiView) error {
	if asJSON || view == nil {
		if len(bytes.TrimSpace(raw)) == 0 {
			return nil
		}
		_, err := fmt.Fprintf(w, "%s\n", bytes.TrimRight(raw, "\n"))
		return err
	}
	var v map[string]any
	if err := json.Unmarshal(raw, &v); err != nil {
		return fmt.Errorf("the apiserver's answer is not a JSON object: %w", err)
	}
	return view(w, v)
}

// at reads the value at a dotted path of v ("live.free_vram_bytes").
func at(v any, path string) any {
	for _, k := range strings.Split(path, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

// cell renders a value for a table: "-" for none, lists by their length.
func cell(v any) string {
	switch x := v.(type) {
	case nil:
		return "-"
	case string:
		if x == "" {
			return "-"
		}
		if t, err := time.Parse(time.RFC3339Nano, x); err == nil {
			return t.Local().Format("2006-01-02 15:04:05")
		}
		return x
	case float64:
		return fmt.Sprintf("%g", x)
	case bool:
		if x {
			return "yes"
		}
		return "no"
	case []any:
		return fmt.Sprint(len(x))
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// table prints the objects of list as rows of the columns' paths.
func table(w io.Writer, list any, heads, paths []string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(heads, "\t"))
	rows, _ := list.([]any)
	for _, r := range rows {
		cells := make([]string, len(paths))
		for i, p := range paths {
			cells[i] = cell(at(r, p))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// fields prints the top-level scalar fields of v as key: value lines, in
// name order (nested objects and lists: --json shows them).
func fields(w io.Writer, v map[string]any) error {
	keys := make([]string, 0, len(v))
	for k, x := range v {
		switch x.(type) {
		case map[string]any, []any:
			continue
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	for _, k := range keys {
		fmt.Fprintf(tw, "%s:\t%s\n", k, cell(v[k]))
	}
	return tw.Flush()
}

// path joins API path segments, escaping each.
func path(segs ...string) string {
	var b strings.Builder
	for _, s := range segs {
		b.WriteByte('/')
		b.WriteString(url.PathEscape(s))
	}
	return b.String()
}

func get(segs ...string) apiCall {
	return func(args []string) (string, string, any, error) {
		return "GET", path(append(segs, args...)...), nil, nil
	}
}

// withID is a POST to /v2/<kind>/<id>/<action>.
func withID(kind, action string, body func() any) apiCall {
	return func(args []string) (string, string, any, error) {
		var b any
		if body != nil {
			b = body()
		}
		return "POST", path("v2", kind, args[0], action), b, nil
	}
}

// message prints the answer's message, else its fields.
func message(w io.Writer, v map[string]any) error {
	if m, ok := v["message"].(string); ok && m != "" {
		_, err := fmt.Fprintln(w, m)
		return err
	}
	return fields(w, v)
}

func nodesCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "nodes", Short: "the cluster's nodes: list, show, drain, undrain"}
	var state string
	ls := resourceCmd("ls [--state S] [--json]", "list the nodes", cobra.NoArgs,
		func([]string) (string, string, any, error) {
			p := "/v2/nodes"
			if state != "" {
				p += "?state=" + url.QueryEscape(state)
			}
			return "GET", p, nil, nil
		},
		func(w io.Writer, v map[string]any) error {
			return table(w, v["nodes"], []string{"NODE", "STATE", "DRAINING", "GPUS", "FREE VRAM", "POOLS", "LAST SEEN"},
				[]string{"node_id", "state", "draining", "inventory.gpus", "live.free_vram_bytes", "live.pools", "last_seen"})
		}, func(c *cobra.Command) {
			c.Flags().StringVar(&state, "state", "", "only nodes in this state (Online, Suspect, Offline, ...)")
		})
	show := resourceCmd("get ID [--json]", "show one node", cobra.ExactArgs(1), get("v2", "nodes"), fields, nil)
	drain := resourceCmd("drain ID [--json]", "stop placing work on a node (running work finishes)", cobra.ExactArgs(1), withID("nodes", "drain", nil), fields, nil)
	undrain := resourceCmd("undrain ID [--json]", "place work on a drained node again", cobra.ExactArgs(1), withID("nodes", "undrain", nil), fields, nil)
	cmd.AddCommand(ls, show, drain, undrain)
	return cmd
}

func poolsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "pools", Short: "engine pools: list, create, health, drain, reload"}
	ls := resourceCmd("ls [--json]", "list the pools", cobra.NoArgs, get("v2", "pools"),
		func(w io.Writer, v map[string]any) error {
			return table(w, v["pools"], []string{"POOL", "NODE", "MODEL", "STATE", "ENGINE", "SLOTS", "FREE", "CTX", "DRAINING"},
				[]string{"pool_id", "node_id", "model_id", "state", "engine", "slots_total", "slots_free", "ctx", "draining"})
		}, nil)
	var spec struct {
		id, node, model, engine, devices string
		slots, ctx, ngl                  int
		embeddings                       bool
	}
	create := resourceCmd("create --node N --model M [--id P] [--engine E] [--slots N] [--ctx N] [--json]", "start a pool of a model on a node",
		cobra.NoArgs, func([]string) (string, string, any, error) {
			if spec.node == "" || spec.model == "" {
				return "", "", nil, fmt.Errorf("--node and --model are required")
			}
			return "POST", "/v2/pools", map[string]any{"pool_id": spec.id, "node_id": spec.node, "model_id": spec.model,
				"engine": spec.engine, "slots": spec.slots, "ctx": spec.ctx, "device_mask": spec.devices, "n_gpu_layers": spec.ngl,
				"embeddings": spec.embeddings}, nil
		}, func(w io.Writer, v map[string]any) error {
			_, err := fmt.Fprintf(w, "pool %s starting on node %s (model %s); follow it with `llorch pools health %s`\n",
				cell(at(v, "pool.pool_id")), cell(at(v, "pool.node_id")), cell(at(v, "pool.model_id")), cell(at(v, "pool.pool_id")))
			return err
		}, func(c *cobra.Command) {
			fs := c.Flags()
			fs.StringVar(&spec.id, "id", "", "pool id (default: the server picks one)")
			fs.StringVar(&spec.node, "node", "", "node to run it on")
			fs.StringVar(&spec.model, "model", "", "catalog model to serve")
			fs.StringVar(&spec.engine, "engine", "", "builtin or llama-server (default: builtin)")
			fs.IntVar(&spec.slots, "slots", 0, "requests the engine runs at once (default: the server's)")
			fs.IntVar(&spec.ctx, "ctx", 0, "context in tokens, split across the slots (default: the server's)")
			fs.StringVar(&spec.devices, "device-mask", "", "GPUs it may use, as CUDA_VISIBLE_DEVICES (default: none, CPU)")
			fs.IntVar(&spec.ngl, "n-gpu-layers", 0, "layers offloaded to the GPUs")
			fs.BoolVar(&spec.embeddings, "embeddings", false, "serve embeddings (mean-pooled) instead of generations")
		})
	health := resourceCmd("health ID [--json]", "show a pool's health", cobra.ExactArgs(1),
		func(args []string) (string, string, any, error) {
			return "GET", path("v2", "pools", args[0], "health"), nil, nil
		}, fields, nil)
	var deadline time.Duration
	drain := resourceCmd("drain ID [--deadline D] [--json]", "stop a pool once its running work ends (at most --deadline)", cobra.ExactArgs(1),
		withID("pools", "drain", func() any { return map[string]any{"deadline_ms": deadline.Milliseconds()} }), fields,
		func(c *cobra.Command) {
			c.Flags().DurationVar(&deadline, "deadline", 0, "how long running work may take before it is cut (0: the server's default)")
		})
	var reloadModel string
	var reloadDeadline time.Duration
	reload := resourceCmd("reload ID --model M [--deadline D] [--json]", "swap a pool to another model without dropping work", cobra.ExactArgs(1),
		func(args []string) (string, string, any, error) {
			if reloadModel == "" {
				return "", "", nil, fmt.Errorf("--model is required")
			}
			return "POST", path("v2", "pools", args[0], "reload"), map[string]any{"model_id": reloadModel, "deadline_ms": reloadDeadline.Milliseconds()}, nil
		}, message, func(c *cobra.Command) {
			c.Flags().StringVar(&reloadModel, "model", "", "catalog model to serve instead")
			c.Flags().DurationVar(&reloadDeadline, "deadline", 0, "how long running work may take before it is cut (0: the server's default)")
		})
	cmd.AddCommand(ls, create, health, drain, reload)
	return cmd
}

// cancelTask asks the apiserver to cancel a task, on a context of its own
// (the command's ended with Ctrl-C).
func cancelTask(api *apiclient.Client, id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := api.Call(ctx, "POST", path("v2", "tasks", id, "cancel"), nil)
	return err
}
