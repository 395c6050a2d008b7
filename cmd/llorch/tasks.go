package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
)

func tasksCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tasks", Short: "inference tasks: submit (streaming its tokens), list, show, cancel"}
	show := resourceCmd("get ID [--json]", "show a task", cobra.ExactArgs(1), get("v2", "tasks"), fields, nil)
	cancel := resourceCmd("cancel ID", "cancel a task", cobra.ExactArgs(1), withID("tasks", "cancel", nil),
		func(w io.Writer, _ map[string]any) error { return nil }, nil)
	cancel.PostRunE = func(cmd *cobra.Command, args []string) error {
		_, err := fmt.Fprintf(cmd.OutOrStdout(), "task %s canceled\n", args[0])
		return err
	}
	var q struct{ state, model, session, since, token string }
	var size int
	ls := resourceCmd("ls [--state S] [--model M] [--session S] [--since T] [--json]", "list tasks, newest first (a page at a time)", cobra.NoArgs,
		func([]string) (string, string, any, error) {
			v := url.Values{}
			for k, x := range map[string]string{"state": q.state, "model": q.model, "session": q.session, "since": q.since, "page_token": q.token} {
				if x != "" {
					v.Set(k, x)
				}
			}
			if size > 0 {
				v.Set("page_size", strconv.Itoa(size))
			}
			p := "/v2/tasks"
			if len(v) > 0 {
				p += "?" + v.Encode()
			}
			return "GET", p, nil, nil
		},
		func(w io.Writer, v map[string]any) error {
			if err := table(w, v["tasks"], []string{"TASK", "MODEL", "STATE", "SESSION", "STARTED", "FINISHED"},
				[]string{"task_id", "model_id", "state", "session_id", "started_at", "finished_at"}); err != nil {
				return err
			}
			if next, ok := v["next_page_token"].(string); ok && next != "" {
				_, err := fmt.Fprintf(w, "more: --page-token %s\n", next)
				return err
			}
			return nil
		}, func(c *cobra.Command) {
			fs := c.Flags()
			fs.StringVar(&q.state, "state", "", "running, completed, failed or canceled")
			fs.StringVar(&q.model, "model", "", "only tasks of this model")
			fs.StringVar(&q.session, "session", "", "only turns of this session")
			fs.StringVar(&q.since, "since", "", "only tasks submitted at or after this RFC 3339 time")
			fs.IntVar(&size, "page-size", 0, "tasks per page, 1-100 (default: the server's, 20)")
			fs.StringVar(&q.token, "page-token", "", "the page a former ls named (more: --page-token ...)")
		})
	cmd.AddCommand(tasksSubmitCmd(), ls, show, cancel)
	return cmd
}

// tasksSubmitCmd submits a task and streams its tokens to stdout as they
// come; its end (tokens, stop) goes to stderr. Ctrl-C cancels the task.
func tasksSubmitCmd() *cobra.Command {
	var (
		f         apiFlags
		asJSON    bool
		modelID   string
		maxTokens int
		temp      float64
		seed      int64
		priority  string
		session   string
		engine    string
		kvHint    string
		detach    bool
	)
	cmd := &cobra.Command{
		Use:   "submit --model ID [--max-tokens N] [--json] PROMPT",
		Short: "submit a task and stream its tokens (Ctrl-C cancels it)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if modelID == "" {
				return errors.New("--model is required")
			}
			api, err := f.client(cmd)
			if err != nil {
				return err
			}
			body := map[string]any{"model_ref": modelID, "prompt": strings.Join(args, " ")}
			if maxTokens > 0 {
				body["max_tokens"] = maxTokens
			}
			if cmd.Flags().Changed("temperature") {
				body["temperature"] = temp
			}
			if cmd.Flags().Changed("seed") {
				body["seed"] = seed
			}
			for k, v := range map[string]string{"priority": priority, "session_id": session, "engine": engine, "kv_hint": kvHint} {
				if v != "" {
					body[k] = v
				}
			}
			ctx, stop := apiContext(cmd, 0)
			defer stop()
			raw, err := api.Call(ctx, "POST", "/v2/tasks", body)
			if err != nil {
				return apiHint(err)
			}
			var sub struct {
				TaskID string `json:"task_id"`
			}
			if err := json.Unmarshal(raw, &sub); err != nil || sub.TaskID == "" {
				return fmt.Errorf("the apiserver's answer names no task: %s", raw)
			}
			out, errOut := cmd.OutOrStdout(), cmd.ErrOrStderr()
			if detach {
				return printAnswer(out, raw, asJSON, func(w io.Writer, v map[string]any) error {
					_, err := fmt.Fprintln(w, sub.TaskID)
					return err
				})
			}
			if asJSON {
				fmt.Fprintf(out, "%s\n", strings.TrimSpace(string(raw)))
			} else {
				fmt.Fprintf(errOut, "task %s\n", sub.TaskID)
			}
			var failed error
			err = api.Events(ctx, path("v2", "tasks", sub.TaskID, "events"), func(event string, data []byte) error {
				if asJSON {
					line, _ := json.Marshal(struct {
						Event string          `json:"event"`
						Data  json.RawMessage `json:"data"`
					}{event, data})
					fmt.Fprintf(out, "%s\n", line)
				}
				var ev struct {
					T            string `json:"t"`
					TokensOut    int    `json:"tokens_out"`
					TokensIn     int    `json:"tokens_in"`
					TokensCached int    `json:"tokens_cached"`
					StopType     string `json:"stop_type"`
					Code         string `json:"code"`
					Message      string `json:"message"`
				}
				_ = json.Unmarshal(data, &ev)
				switch event {
				case "token":
					if !asJSON {
						fmt.Fprint(out, ev.T)
					}
				case "end":
					if !asJSON {
						fmt.Fprintf(out, "\n")
						fmt.Fprintf(errOut, "end: %d tokens, stop %s (prompt %d tokens, %d from a slot's cache)\n",
							ev.TokensOut, ev.StopType, ev.TokensIn, ev.TokensCached)
					}
					return io.EOF
				case "error":
					failed = fmt.Errorf("task %s failed: %s: %s", sub.TaskID, ev.Code, ev.Message)
					return io.EOF
				}
				return nil
			})
			if ctx.Err() != nil {
				// Ctrl-C or SIGTERM: the task stops too.
				if cerr := cancelTask(api, sub.TaskID); cerr != nil {
					return fmt.Errorf("interrupted; cancelling task %s failed: %w", sub.TaskID, cerr)
				}
				fmt.Fprintf(errOut, "\ntask %s canceled\n", sub.TaskID)
				return errInterrupted
			}
			if err != nil {
				return apiHint(err)
			}
			return failed
		},
	}
	f.add(cmd.Flags(), false)
	fs := cmd.Flags()
	fs.BoolVar(&asJSON, "json", false, "print the submission's answer and each event as JSON lines instead of the text")
	fs.StringVar(&modelID, "model", "", "catalog model to run")
	fs.IntVar(&maxTokens, "max-tokens", 0, "tokens to generate at most (default: the server's)")
	fs.Float64Var(&temp, "temperature", 0, "sampling temperature (default: the server's; 0 is greedy)")
	fs.Int64Var(&seed, "seed", 0, "sampling seed")
	fs.StringVar(&priority, "priority", "", "interactive or batch (default: interactive)")
	fs.StringVar(&session, "session", "", "session id: the task is a turn of it")
	fs.StringVar(&engine, "engine", "", "run only on pools of this engine: builtin, llama-server, llamacpp (any)")
	fs.StringVar(&kvHint, "kv-hint", "", "reuse (the default: the pool and slot caching the prompt's prefix) or cold (load alone, the whole prompt decoded)")
	fs.BoolVar(&detach, "detach", false, "print the task id and return without streaming")
	bindAPIEnv(fs)
	return cmd
}

// errInterrupted ends a command the user interrupted; main exits 130.
var errInterrupted = errors.New("interrupted")
