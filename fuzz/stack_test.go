package fuzz

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/testenv"
	"github.com/llorch/llorch/tokenstream"
	"github.com/llorch/llorch/workers"
)

const token = "fuzz-token"

// The fixtures every input may read: a node run by a real worker, a model
// in the catalog, a Ready pool of it on the built-in engine, a finished
// task and a session.
const (
	fixNode    = "fz-node"
	fixModel   = "fz-tiny"
	fixPool    = "fz-pool"
	fixTask    = "fz-task"
	fixSession = "fz-session"
)

// stack is the running system, started once per process that runs inputs
// (a fuzzing worker, or plain `go test`), on the first input.
type stack struct {
	env      *testenv.Env
	bin      string
	home     string
	addr     string
	logs     *testenv.Buffer // the apiserver's warnings and errors
	stopAPI  func()
	worker   *proc
	baseline float64 // the apiserver's goroutines once the fixtures are up
}

var (
	stackOnce sync.Once
	theStack  *stack
	stackErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if theStack != nil {
		if code == 0 && !fuzzWorker() {
			if err := theStack.checkBaseline(); err != nil {
				fmt.Fprintln(os.Stderr, "FAIL: fuzz:", err)
				code = 1
			}
		}
		theStack.stop()
	}
	os.Exit(code)
}

func fuzzWorker() bool {
	for _, a := range os.Args {
		if strings.HasPrefix(a, "-test.fuzzworker") {
			return true
		}
	}
	return false
}

// getStack is the process's stack, started on first use.
func getStack(t testing.TB) *stack {
	t.Helper()
	stackOnce.Do(func() { theStack, stackErr = startStack(t) })
	if stackErr != nil {
		t.Fatalf("fuzz: starting the stack: %v", stackErr)
	}
	return theStack
}

// proc is one llorch process with its output kept for failure messages.
type proc struct {
	cmd  *exec.Cmd
	out  *testenv.Buffer
	done chan struct{}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (s *stack) run(args ...string) (*proc, error) {
	p := &proc{out: &testenv.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(s.bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token}
	// A fuzzing worker the coordinator kills must not leave them behind.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	return p, nil
}

func (s *stack) s3Flags() []string {
	return []string{"--temporal-address", s.env.TemporalAddr, "--home", s.home,
		"--s3-endpoint", s.env.S3.Endpoint, "--s3-access-key", s.env.S3.AccessKey,
		"--s3-secret-key", s.env.S3.SecretKey, "--s3-bucket", s.env.S3.Bucket}
}

func startStack(t testing.TB) (*stack, error) {
	env, err := testenv.Start()
	if err != nil {
		return nil, err
	}
	s := &stack{env: env, bin: testenv.Llorch(t), home: filepath.Join(env.Dir, "home")}
	if err := s.startAPI(); err != nil {
		s.stop()
		return nil, err
	}
	s.worker, err = s.run(append([]string{"worker", "--node-id", fixNode, "--metrics-addr", "127.0.0.1:0",
		"--heartbeat-interval", "1s", "--llama-lib-dir", testenv.LlamaLib(t)}, s.s3Flags()...)...)
	if err != nil {
		s.stop()
		return nil, err
	}
	if err := s.fixtures(); err != nil {
		s.stop()
		return nil, fmt.Errorf("%w\n--- apiserver ---\n%s\n--- worker ---\n%s", err, tail(s.logs), tail(s.worker.out))
	}
	s.baseline, err = s.goroutines()
	if err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

func tail(b *testenv.Buffer) string {
	out := b.String()
	return out[max(0, len(out)-4096):]
}

// startAPI runs the apiserver in this process, wired as `llorch
// apiserver` wires it (control worker, cluster view, scheduler), so the
// fuzzing engine's coverage reaches into its handlers and a panic in any
// of its goroutines is a crash the engine records with its input. Its
// queue is small: the state inputs can create is bounded by the cluster's
// own limits (docs/security.md, "Fuzzing").
func (s *stack) startAPI() error {
	port, err := testenv.FreePort()
	if err != nil {
		return err
	}
	s.addr = fmt.Sprintf("127.0.0.1:%d", port)
	s.logs = &testenv.Buffer{}
	log := slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	tc, ns := s.env.Temporal, s.env.Namespace
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector())
	nodes := &control.Nodes{Temporal: tc, Namespace: ns, Via: "rest", Metrics: control.NewNodeMetrics(reg)}
	store, err := modelstore.New(s.env.S3)
	if err != nil {
		return err
	}
	hub := &tokenstream.Hub{}
	tokenstream.NewHubMetrics(reg, hub)
	pools, tasks, sessions := &control.Pools{Temporal: tc, Namespace: ns}, &control.Tasks{Temporal: tc}, &control.Sessions{Temporal: tc}
	view := &scheduler.LinkView{Pools: pools, Nodes: nodes, Log: log, Metrics: scheduler.NewViewMetrics(reg),
		Suspect: nodes.Suspect, Identity: "fuzz-apiserver"}
	sched := &scheduler.Scheduler{Capacity: 8, Policy: scheduler.Reject, Log: log, Metrics: scheduler.NewMetrics(reg),
		Source: view.Candidates, Fresh: view.Fresh, Tasks: tasks, Sessions: sessions}
	view.Changed = sched.Changed
	srv, err := apiserver.New(apiserver.Config{Addr: s.addr, Token: token}, apiserver.Deps{
		Nodes: nodes, Store: store, Registry: reg, Logger: log, Scheduler: sched, Hub: hub, Links: view,
		Models: &control.Models{Temporal: tc, Namespace: ns, Nodes: nodes},
		Pools:  pools, Tasks: tasks, Sessions: sessions,
	})
	if err != nil {
		return err
	}
	w := workers.NewControl(tc, &activities.CatalogActivities{Store: store}, &scheduler.TaskControl{S: sched, Hub: hub, Metrics: sched.Metrics})
	if err := w.Start(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go view.Run(ctx)
	go sched.Run(ctx)
	s.stopAPI = func() {
		_ = srv.Shutdown(context.Background())
		cancel()
		w.Stop()
	}
	if err := srv.Listen(s.addr); err != nil {
		return err
	}
	return s.until(60*time.Second, "apiserver healthy", func() (bool, string) {
		st, body, err := s.call("GET", "/health", "")
		return err == nil && st == 200, fmt.Sprint(st, body, err)
	})
}

func (s *stack) until(timeout time.Duration, what string, cond func() (bool, string)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %s: %s", what, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// call is an ordinary authenticated request of the harness itself.
func (s *stack) call(method, path, body string) (int, string, error) {
	req, err := http.NewRequest(method, "http://"+s.addr+path, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	return res.StatusCode, string(raw), nil
}

func (s *stack) fixtures() error {
	err := s.until(60*time.Second, "node "+fixNode+" online", func() (bool, string) {
		st, body, err := s.call("GET", "/v2/nodes/"+fixNode, "")
		return err == nil && st == 200 && strings.Contains(body, `"state":"Online"`), fmt.Sprint(st, body, err)
	})
	if err != nil {
		return err
	}
	path := filepath.Join(s.env.Dir, "tiny.gguf")
	if err := modelstore.WriteTinyFile(path, modelstore.TinyOptions{Seed: 12}); err != nil {
		return err
	}
	store, err := modelstore.New(s.env.S3)
	if err != nil {
		return err
	}
	ctx := context.Background()
	if err := store.EnsureBucket(ctx); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := store.Upload(ctx, f, -1, model.DefaultKey(fixModel), nil); err != nil {
		return err
	}
	steps := []struct{ method, path, body string }{
		{"POST", "/v2/catalog/models", `{"id":"` + fixModel + `","key":"` + model.DefaultKey(fixModel) + `"}`},
		// A small context bounds every generation an input can ask for.
		{"POST", "/v2/pools", `{"pool_id":"` + fixPool + `","model_id":"` + fixModel + `","node_id":"` + fixNode + `","slots":2,"ctx":512}`},
	}
	for _, st := range steps {
		if code, body, err := s.call(st.method, st.path, st.body); err != nil || code >= 300 {
			return fmt.Errorf("%s %s: %d %s %v", st.method, st.path, code, body, err)
		}
	}
	err = s.until(120*time.Second, "pool "+fixPool+" ready", func() (bool, string) {
		st, body, err := s.call("GET", "/v2/pools/"+fixPool+"/health", "")
		return err == nil && st == 200 && strings.Contains(body, `"state":"Ready"`), fmt.Sprint(st, body, err)
	})
	if err != nil {
		return err
	}
	for _, body := range []string{
		`{"task_id":"` + fixTask + `","model_ref":"` + fixModel + `","prompt":"Once","max_tokens":4}`,
		`{"session_id":"` + fixSession + `","model_ref":"` + fixModel + `","prompt":"Once","max_tokens":2}`,
	} {
		if code, out, err := s.call("POST", "/v2/tasks", body); err != nil || code != 202 {
			return fmt.Errorf("POST /v2/tasks %s: %d %s %v", body, code, out, err)
		}
	}
	return s.until(60*time.Second, "task "+fixTask+" done", func() (bool, string) {
		st, body, err := s.call("GET", "/v2/tasks/"+fixTask, "")
		return err == nil && st == 200 && strings.Contains(body, `"state":"Completed"`), fmt.Sprint(st, body, err)
	})
}

// metric reads one unlabelled sample from the apiserver's /metrics.
func (s *stack) metric(name string) (float64, error) {
	res, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + s.addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("no %s in /metrics", name)
}

func (s *stack) goroutines() (float64, error) { return float64(runtime.NumGoroutine()), nil }

// checkBaseline: once the inputs are done, the apiserver's goroutines
// return to near what they were with the fixtures alone (an input that
// leaves one behind per request shows here; one that leaves a stream
// open holds its connection's goroutines).
func (s *stack) checkBaseline() error {
	limit := s.baseline*1.25 + 30
	var now float64
	err := s.until(60*time.Second, "goroutines back to baseline", func() (bool, string) {
		var err error
		now, err = s.goroutines()
		return err == nil && now <= limit, fmt.Sprintf("%.0f goroutines (baseline %.0f, limit %.0f) %v", now, s.baseline, limit, err)
	})
	streams, _ := s.metric("llorch_token_streams")
	fmt.Printf("fuzz: apiserver goroutines %.0f at the end (baseline %.0f), token streams %.0f\n", now, s.baseline, streams)
	return err
}

func (s *stack) stop() {
	if s.stopAPI != nil {
		s.stopAPI()
	}
	if s.worker != nil {
		s.worker.kill()
	}
	if s.home != "" {
		testenv.KillMentioning(s.home) // engines the worker started
	}
	s.env.Stop()
}

// routes is the apiserver's route table, read from an apiserver built
// with every dependency set (some routes exist only with theirs), so a
// route added to apiserver/routes.go is fuzzed with no edit here.
func routes() ([]string, error) {
	reg := prometheus.NewRegistry()
	nodes := &control.Nodes{}
	tasks := &control.Tasks{}
	srv, err := apiserver.New(apiserver.Config{Addr: "127.0.0.1:0", Token: token}, apiserver.Deps{
		Nodes: nodes, Models: &control.Models{Nodes: nodes}, Pools: &control.Pools{}, Tasks: tasks,
		Store: &modelstore.Store{}, Scheduler: &scheduler.Scheduler{}, Hub: &tokenstream.Hub{},
		Sessions: &control.Sessions{}, Keys: noKeys{}, Registry: reg,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return nil, err
	}
	var out []string
	seen := map[string]bool{}
	for _, r := range srv.App().GetRoutes(true) {
		k := r.Method + " " + r.Path
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	return out, nil
}

type noKeys struct{}

func (noKeys) Lookup(string) (apikey.Principal, bool) { return apikey.Principal{}, false }
