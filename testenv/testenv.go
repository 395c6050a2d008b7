package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/workers/engines"
)

// Env is the set of real services shared by one test package.
type Env struct {
	Temporal     client.Client
	TemporalAddr string
	Namespace    string
	S3           config.S3
	Dir          string
	// CodecKeys is the payload codec's key list (codec.EnvKeys) of the
	// processes a test starts; Codec is that codec, which the Temporal
	// client above uses too, as every llorch client does.
	CodecKeys string
	Codec     *codec.Codec

	dev *testsuite.DevServer
	s3  *exec.Cmd
}

// Main starts the services, runs the package's tests and stops them. Use it
// from TestMain: `func TestMain(m *testing.M) { testenv.Main(m, &env) }`.
func Main(m *testing.M, env **Env) { os.Exit(Run(m, env)) }

// Run is Main without the exit: it returns the tests' exit code, for a
// TestMain with more to do once the services are stopped.
func Run(m *testing.M, env **Env) int {
	e, err := start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	*env = e
	code := m.Run()
	e.stop()
	return code
}

// RepoRoot is the directory holding go.mod.
func RepoRoot() string {
	dir, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			panic("testenv: no go.mod above the working directory")
		}
		dir = parent
	}
}

// Tool finds a pinned tool: $LLORCH_<NAME>_BIN, <repo>/bin/<name>, then PATH.
func Tool(name string) (string, error) {
	if p := os.Getenv("LLORCH_" + strings.ToUpper(name) + "_BIN"); p != "" {
		return p, nil
	}
	if p := filepath.Join(RepoRoot(), "bin", name); fileExists(p) {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found in bin/ or PATH: run `just tools` (installs the pinned temporal CLI and versitygw)", name)
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func start() (*Env, error) {
	dir, err := os.MkdirTemp("", "llorch-testenv-")
	if err != nil {
		return nil, err
	}
	e := &Env{Dir: dir, Namespace: "default", CodecKeys: codec.NewKey("testenv")}
	if e.Codec, err = codec.Parse(e.CodecKeys); err != nil {
		return nil, err
	}
	temporalBin, err := Tool("temporal")
	if err != nil {
		return nil, err
	}
	log, err := os.Create(filepath.Join(dir, "temporal.log"))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e.dev, err = testsuite.StartDevServer(ctx, testsuite.DevServerOptions{
		ExistingPath: temporalBin,
		ClientOptions: &client.Options{
			Namespace:     e.Namespace,
			Logger:        quietLogger{},
			DataConverter: codec.DataConverter(e.Codec),
		},
		LogLevel:         "error",
		SearchAttributes: searchAttributes(),
		Stdout:           log, Stderr: log,
	})
	if err != nil {
		return nil, fmt.Errorf("start temporal dev server: %w", err)
	}
	e.Temporal = e.dev.Client()
	e.TemporalAddr = e.dev.FrontendHostPort()
	if err := e.startS3(); err != nil {
		e.stop()
		return nil, err
	}
	return e, nil
}

func (e *Env) startS3() error {
	bin, err := Tool("versitygw")
	if err != nil {
		return err
	}
	root := filepath.Join(e.Dir, "s3")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	port, err := FreePort()
	if err != nil {
		return err
	}
	e.S3 = config.S3{
		Endpoint:  fmt.Sprintf("127.0.0.1:%d", port),
		AccessKey: randomHex(8), SecretKey: randomHex(16),
		Bucket: "llorch-models", Region: "us-east-1",
	}
	var out bytes.Buffer
	e.s3 = exec.Command(bin, "--port", e.S3.Endpoint, "--quiet", "posix", root)
	// The keys go in its environment: a command line is readable in ps.
	e.s3.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+e.S3.AccessKey, "ROOT_SECRET_ACCESS_KEY="+e.S3.SecretKey)
	e.s3.Stdout, e.s3.Stderr = &out, &out
	// A test binary killed by its timeout must not leave the server behind.
	e.s3.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.s3.Start(); err != nil {
		return fmt.Errorf("start versitygw: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", e.S3.Endpoint, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("versitygw not listening on %s after 30s: %s", e.S3.Endpoint, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *Env) stop() {
	if e.s3 != nil && e.s3.Process != nil {
		_ = e.s3.Process.Kill()
		_ = e.s3.Wait()
	}
	if e.dev != nil {
		_ = e.dev.Stop()
	}
	_ = os.RemoveAll(e.Dir)
}

// searchAttributes registers the keys llorch's workflows use (only their
// names and types matter here).
func searchAttributes() temporal.SearchAttributes {
	var updates []temporal.SearchAttributeUpdate
	for _, k := range control.SearchAttributes {
		updates = append(updates, k.ValueSet(""))
	}
	return temporal.NewSearchAttributes(updates...)
}

// FreePort asks the kernel for a free loopback port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// RandomBytes is n random bytes: content no two tests share.
func RandomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// SHA256 is the hex SHA-256 of b, the digest the catalog names content by.
func SHA256(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// Llorch builds cmd/llorch once per test binary and returns its path.
func Llorch(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "llorch-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "llorch")
		cmd := exec.Command("go", "build", "-o", buildPath, "./cmd/llorch")
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/llorch: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// Eventually polls cond until it holds or timeout passes; the failure
// message is cond's last description of what it saw.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ok, seen := cond()
		if ok {
			return
		}
		last = seen
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s; last seen: %s", what, timeout, last)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// quietLogger drops the SDK's chatter in tests.
type quietLogger struct{}

func (quietLogger) Debug(string, ...interface{}) {}
func (quietLogger) Info(string, ...interface{})  {}
func (quietLogger) Warn(string, ...interface{})  {}
func (quietLogger) Error(string, ...interface{}) {}

// LlamaLib is the libllama dir for engine tests. It fails, never skips,
// without one: CI installs it with `just tools`.
func LlamaLib(t testing.TB) string {
	t.Helper()
	dir, err := engine.LibDir("")
	if errors.Is(err, engine.ErrNoLibrary) {
		t.Fatalf("libllama is not installed: run `just tools` (it fills ./bin/llama), or set %s: %v", engine.LibDirEnv, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// Alive says whether pid is a running process (a zombie counts as gone).
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// KillMentioning SIGKILLs every process whose command line names s (a
// test's temp dir): nothing a test started outlives it.
func KillMentioning(s string) {
	for pid := range mentioning(s) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// Mentioning describes ("pid: command line") each live process whose
// command line names s: what a test would leave running.
func Mentioning(s string) []string {
	var out []string
	for pid, cmdline := range mentioning(s) {
		if Alive(pid) {
			out = append(out, fmt.Sprintf("%d: %s", pid, cmdline))
		}
	}
	sort.Strings(out)
	return out
}

// mentioning maps the pid of each process but this one whose command line
// names s to that command line.
func mentioning(s string) map[int]string {
	out := map[int]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(b), s) {
			out[pid] = strings.ReplaceAll(string(b), "\x00", " ")
		}
	}
	return out
}

// Buffer is a bytes.Buffer a process writes while a test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// EnginePIDs lists the live engine processes of a pool on this machine, by
// the marker llorch puts in each engine's environment.
func EnginePIDs(poolID string) []int {
	var out []int
	for _, e := range engines.OfPool(poolID) {
		out = append(out, e.PID)
	}
	return out
}

// TerminateRunning ends every running workflow of the given types: pools
// and tasks a test leaves would keep the shared server's control workers
// busy, and hold their ids, in later tests.
func (e *Env) TerminateRunning(t testing.TB, types ...string) {
	ctx := context.Background()
	for _, typ := range types {
		resp, err := e.Temporal.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
			Query: fmt.Sprintf("WorkflowType = '%s' AND ExecutionStatus = 'Running'", typ), PageSize: 1000})
		if err != nil {
			t.Logf("cleanup: list %s workflows: %v", typ, err)
			continue
		}
		for _, ex := range resp.GetExecutions() {
			_ = e.Temporal.TerminateWorkflow(ctx, ex.GetExecution().GetWorkflowId(), ex.GetExecution().GetRunId(), "test over")
		}
	}
}

var uniqueIDs sync.Map // base -> *atomic.Int64

// Unique is base the first time this process asks for it and base-rN
// after: ids that outlive a test (a task id is an idempotency key) differ
// between repeated runs of the test (go test -count, just chaos TRIALS).
func Unique(base string) string {
	v, _ := uniqueIDs.LoadOrStore(base, new(atomic.Int64))
	if n := v.(*atomic.Int64).Add(1); n > 1 {
		return fmt.Sprintf("%s-r%d", base, n)
	}
	return base
}

// DataConverter is the converter of the env's codec: what control's
// clients need to read the payloads Temporal returns raw (memos, heartbeat
// details), since every payload a test's processes write is encrypted.
func (e *Env) DataConverter() converter.DataConverter { return codec.DataConverter(e.Codec) }
