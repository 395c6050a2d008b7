package fuzz

import (
	"bufio"
	"context"
	"encoding/json"
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
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"

	"github.com/llorch/llorch/apiserver"
	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/controlplane"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/testenv"
)

const token = "fuzz-token"

// The fixtures every input may read: a node run by a real worker, a model
// in the catalog, a Ready pool of it on the built-in engine, a finished
// task and a session, and an inference key with limits (its id is the
// registry's choice).
const (
	fixNode    = "fz-node"
	fixModel   = "fz-tiny"
	fixPool    = "fz-pool"
	fixTask    = "fz-task"
	fixSession = "fz-session"
)

// fixKeyID and fixKeySecret are the fixture key's, once the stack is up
// ($KEY in an input's headers stands for its secret).
var fixKeyID, fixKeySecret string

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
	// Secrets travel in the environment (the configuration refuses them as
	// flags); the payloads are encrypted with the shared env's codec.
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token,
		"LLORCH_S3_ACCESS_KEY=" + s.env.S3.AccessKey, "LLORCH_S3_SECRET_KEY=" + s.env.S3.SecretKey,
		codec.EnvKeys + "=" + s.env.CodecKeys}
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
		"--s3-endpoint", s.env.S3.Endpoint, "--s3-bucket", s.env.S3.Bucket}
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

// planeConfig is the fuzzed apiserver's configuration: production's
// assembly (controlplane, as `llorch apiserver` builds it) over the given
// Temporal client, with a small queue: the state inputs can create is
// bounded by the cluster's own limits (docs/security.md, "Fuzzing"). Its
// audit trail is written and dropped.
func planeConfig(tc client.Client, dc converter.DataConverter, ns string, store *modelstore.Store, log *slog.Logger) controlplane.Config {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return controlplane.Config{
		Temporal: tc, DataConverter: dc, Namespace: ns, Identity: "fuzz-apiserver",
		Store: store, API: apiserver.Config{Addr: "127.0.0.1:0", Token: token},
		Logger: log, Registry: reg, Audit: io.Discard, MachineID: "fuzz",
		QueueCapacity: 8, Policy: scheduler.Reject, OutputRetention: 7 * 24 * time.Hour,
	}
}

// startAPI runs the apiserver in this process, so the fuzzing engine's
// coverage reaches into its handlers and a panic in any of its goroutines
// is a crash the engine records with its input.
func (s *stack) startAPI() error {
	s.logs = &testenv.Buffer{}
	log := slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := modelstore.New(s.env.S3)
	if err != nil {
		return err
	}
	plane, err := controlplane.New(planeConfig(s.env.Temporal, codec.DataConverter(s.env.Codec), s.env.Namespace, store, log))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := plane.Start(ctx); err != nil {
		return err
	}
	s.stopAPI = func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = plane.Stop(ctx)
	}
	s.addr = plane.API.Addr()
	routeTable = routesOf(plane.API)
	return s.until(30*time.Second, "apiserver healthy", func() (bool, string) {
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
	return s.callAs("Bearer "+token, method, path, body)
}

func (s *stack) callAs(auth, method, path, body string) (int, string, error) {
	req, err := http.NewRequest(method, "http://"+s.addr+path, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", auth)
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
	err = s.until(60*time.Second, "task "+fixTask+" done", func() (bool, string) {
		st, body, err := s.call("GET", "/v2/tasks/"+fixTask, "")
		return err == nil && st == 200 && strings.Contains(body, `"state":"Completed"`), fmt.Sprint(st, body, err)
	})
	if err != nil {
		return err
	}
	return s.fixtureKey()
}

// fixtureKey creates the inference key inputs may authenticate with, its
// limits low enough that inputs reach the quota refusals, and waits until
// the apiserver's key cache knows it.
func (s *stack) fixtureKey() error {
	code, body, err := s.call("POST", "/v2/keys", `{"name":"fz-key","scopes":["inference"],"limits":{"requests_per_minute":120,"concurrent_tasks":2}}`)
	if err != nil || code != 201 {
		return fmt.Errorf("POST /v2/keys: %d %s %v", code, body, err)
	}
	var k struct {
		ID     string `json:"key_id"`
		Secret string `json:"secret"`
	}
	if err := json.Unmarshal([]byte(body), &k); err != nil || k.ID == "" || k.Secret == "" {
		return fmt.Errorf("POST /v2/keys: no key_id and secret in %s (%v)", body, err)
	}
	fixKeyID, fixKeySecret = k.ID, k.Secret
	return s.until(10*time.Second, "key "+k.ID+" authenticates", func() (bool, string) {
		st, body, err := s.callAs("Bearer "+k.Secret, "GET", "/v1/models", "")
		return err == nil && st == 200, fmt.Sprint(st, body, err)
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

// routes is the route table of the fuzzed apiserver, built as the stack
// builds it over a Temporal client that never connects, so a route added
// to apiserver/routes.go is checked for a seed (TestRoutesCovered) with
// no stack and no edit here. FuzzAPI reads the running server's.
func routes() ([]string, error) {
	tc, err := client.NewLazyClient(client.Options{HostPort: "127.0.0.1:1", Logger: quiet{}})
	if err != nil {
		return nil, err
	}
	defer tc.Close()
	plane, err := controlplane.New(planeConfig(tc, nil, "default", &modelstore.Store{}, slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		return nil, err
	}
	return routesOf(plane.API), nil
}

// routesOf lists a server's routes, "METHOD /path", each once.
func routesOf(srv *apiserver.Server) []string {
	var out []string
	seen := map[string]bool{}
	for _, r := range srv.App().GetRoutes(true) {
		k := r.Method + " " + r.Path
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	return out
}

// quiet is the Temporal SDK's logger for a client that never connects.
type quiet struct{}

func (quiet) Debug(string, ...any) {}
func (quiet) Info(string, ...any)  {}
func (quiet) Warn(string, ...any)  {}
func (quiet) Error(string, ...any) {}
