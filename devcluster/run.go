package devcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
)

// errInterrupted marks a start-up cut short by the user; Run then stops what
// it started and returns nil, as for a stop after start-up.
var errInterrupted = errors.New("interrupted")

// Run starts the dev cluster, prints how to use it once every part is ready,
// and runs until ctx is cancelled (Ctrl-C, SIGTERM) or a child dies. It
// stops every child before it returns, on every path. A stop asked for by
// cancelling ctx returns nil when every child stopped cleanly.
func Run(ctx context.Context, cfg Config, out io.Writer) (err error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	// Find every binary before starting anything: a missing one is the most
	// likely first-run failure, and it should not cost a Temporal start.
	temporalBin, err := ResolveBin("temporal", cfg.TemporalBin, "--temporal-bin", temporalInstall)
	if err != nil {
		return err
	}
	vgwBin, err := ResolveBin("versitygw", cfg.VersitygwBin, "--versitygw-bin", versitygwInstall)
	if err != nil {
		return err
	}
	exe := cfg.Exe
	if exe == "" {
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("find the llorch executable: %w", err)
		}
	}
	if err := os.MkdirAll(cfg.Home, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	absHome, err := filepath.Abs(cfg.Home)
	if err != nil {
		return err
	}
	release, err := lockHome(absHome)
	if err != nil {
		return err
	}
	defer release()
	if err := cfg.CheckPorts(); err != nil {
		return err
	}
	st, err := Setup(cfg)
	if err != nil {
		return err
	}
	s3Dir := filepath.Join(st.Home, "s3")
	if err := os.MkdirAll(s3Dir, 0o700); err != nil {
		return fmt.Errorf("create S3 dir: %w", err)
	}

	s := &supervisor{cfg: cfg, exe: exe, out: &syncWriter{w: out}, sp: newSpawner(), dead: make(chan struct{})}
	defer func() {
		if s.lb != nil {
			// Clients first: streams through the balancer end before the
			// replicas behind it stop.
			_ = s.lb.Close()
		}
		stopErr := s.stopAll()
		s.sp.close()
		switch {
		case errors.Is(err, errInterrupted):
			s.out.line("dev", "interrupted during start-up; everything it started is stopped")
			err = stopErr
		case err == nil:
			err = stopErr
		case stopErr != nil:
			s.out.line("dev", "also while stopping: "+stopErr.Error())
		}
	}()
	return s.run(ctx, st, temporalBin, vgwBin, exe, s3Dir)
}

// supervisor owns the children of one Run.
type supervisor struct {
	exe      string // this llorch binary, for the hint on adding a node
	cfg      Config
	out      *syncWriter
	sp       *spawner
	mu       sync.Mutex
	children []*child // in start order
	// dead is closed when the first child exits without being asked to;
	// deadChild (under mu) is that child.
	dead      chan struct{}
	deadOnce  sync.Once
	deadChild *child
	// closing (under mu) is set when stopAll starts: no replica restarts
	// after it.
	closing bool
	// restartReplicas is set once the cluster is up: a replica that dies
	// then is restarted (with N > 1), while one that dies during start-up
	// stops everything like any other child.
	restartReplicas atomic.Bool
	replicas        []*replica
	lb              *http.Server // the balancer on the API port, with N > 1
}

func (s *supervisor) run(ctx context.Context, st State, temporalBin, vgwBin, exe, s3Dir string) error {
	cfg := s.cfg
	temporalAddr, uiAddr := hostPort(cfg.TemporalPort), hostPort(cfg.UIPort)
	s3Addr, apiAddr, metricsAddr := hostPort(cfg.S3Port), hostPort(cfg.APIPort), hostPort(cfg.WorkerMetricsPort)
	apiURL := "http://" + apiAddr

	// Temporal and S3 do not depend on each other: start both, then wait.
	args := []string{
		"server", "start-dev",
		"--ip", "127.0.0.1", "--port", strconv.Itoa(cfg.TemporalPort), "--ui-port", strconv.Itoa(cfg.UIPort),
		"--db-filename", filepath.Join(st.Home, "temporal.db"),
		// The default SQLite settings are too slow on a plain disk (workflow
		// starts time out under load); WAL without fsync is fine for dev data.
		"--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off",
		"--log-level", "warn",
		"--namespace", "default",
	}
	// The CLI applies these only when it creates the namespace, i.e. on
	// the first run with a new database; on later runs they are ignored,
	// not an error (checked with CLI v1.5.1). The apiserver adds any that
	// are missing through the operator API at its start.
	for _, k := range control.SearchAttributes {
		args = append(args, "--search-attribute", k.GetName()+"=Keyword")
	}
	temporal, err := s.start("temporal", temporalBin, args, childEnv())
	if err != nil {
		return err
	}
	// Keys go in the environment, not the command line, where every local
	// user could read them in ps.
	s3, err := s.start("s3", vgwBin, []string{"--port", s3Addr, "--quiet", "posix", s3Dir},
		childEnv("ROOT_ACCESS_KEY_ID="+st.AccessKey, "ROOT_SECRET_ACCESS_KEY="+st.SecretKey))
	if err != nil {
		return err
	}
	mc, err := s3Client(s3Addr, st.AccessKey, st.SecretKey)
	if err != nil {
		return err
	}
	if err := s.waitReady(ctx, s3, "S3 ListBuckets", s3Ready(mc)); err != nil {
		return err
	}
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	created, err := ensureBucket(bctx, mc, cfg.Bucket)
	cancel()
	if err != nil {
		return s.interrupted(ctx, err)
	}
	if created {
		s.out.line("dev", "created bucket "+cfg.Bucket)
	}
	if err := s.waitReady(ctx, temporal, "Temporal health check", temporalReady(temporalAddr, uiAddr)); err != nil {
		return err
	}

	common := []string{"--home", st.Home, "--temporal-address", temporalAddr, "--temporal-namespace", "default"}
	// The audit trail goes to its own file too (every replica appends to it).
	apiCommon := slices.Concat(common, []string{"--audit-log", filepath.Join(st.Home, AuditLogFile)})
	if cfg.APIServers == 1 {
		// The token goes in the environment, not on the command line (ps).
		// A task for a pushed model starts its pool: one command to a first answer.
		api, err := s.start("apiserver", exe, append([]string{"apiserver", "--addr", apiAddr, "--auto-pools"}, apiCommon...),
			childEnv(envToken+"="+st.Token, envCodecKeys+"="+st.CodecKeys))
		if err != nil {
			return err
		}
		if err := s.waitReady(ctx, api, "GET /health", httpOK(apiURL+"/health")); err != nil {
			return err
		}
	} else if err := s.startReplicas(ctx, exe, apiAddr, apiCommon, childEnv(envToken+"="+st.Token, envCodecKeys+"="+st.CodecKeys)); err != nil {
		return err
	}
	worker, err := s.start("worker", exe, append([]string{"worker", "--node-id", cfg.NodeID, "--metrics-addr", metricsAddr}, common...),
		childEnv(envCodecKeys+"="+st.CodecKeys))
	if err != nil {
		return err
	}
	if err := s.waitReady(ctx, worker, "GET /health", httpOK("http://"+metricsAddr+"/health")); err != nil {
		return err
	}
	// The worker's /health is up before it registers its node. Wait for the
	// node to be Online so the printed curl shows it, but only as a courtesy:
	// the cluster is usable without it, and the node list says why not.
	state := s.waitOnline(ctx, apiURL, st.Token)
	if err := s.stopped(ctx); err != nil {
		return err
	}

	s.restartReplicas.Store(true)
	s.banner(st, state)
	select {
	case <-ctx.Done():
		s.out.line("dev", "stopping (Ctrl-C again to kill at once)")
		return nil
	case <-s.dead:
		return s.crashErr()
	}
}

// childEnv is our environment minus what would point a child elsewhere than
// this dev cluster: a shell that sourced dev.env of another cluster, or
// production settings (TLS, API keys) that the local servers do not speak.
// Logging and simulation knobs (LLORCH_LOG_LEVEL, LLORCH_NVML_MOCK) pass.
func childEnv(extra ...string) []string {
	drop := []string{"LLORCH_TEMPORAL_", "LLORCH_API_", "LLORCH_LINK_", "LLORCH_S3_", "LLORCH_CODEC_", "LLORCH_HOME=", "LLORCH_NODE_ID=",
		"LLORCH_METRICS_ADDR=", "LLORCH_MODEL_DIR=", "TEMPORAL_", "VGW_", "ROOT_ACCESS_KEY", "ROOT_SECRET"}
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, p := range drop {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

func (s *supervisor) start(tag, bin string, args, env []string) (*child, error) {
	return s.spawn(-1, tag, bin, args, env, nil)
}

// errClosing is a spawn refused because everything is stopping.
var errClosing = errors.New("llorch dev is stopping")

// spawn starts a child and watches it. at >= 0 puts it in that place of
// the children instead of appending it, so a restarted replica keeps its
// place in the stop order. onCrash, when set, may take an unexpected exit
// over (true) instead of it stopping everything.
func (s *supervisor) spawn(at int, tag, bin string, args, env []string, onCrash func(*child) bool) (*child, error) {
	s.out.line("dev", fmt.Sprintf("starting %s: %s %s", tag, bin, strings.Join(args, " ")))
	// Under mu, so stopAll sees every child that will ever run.
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return nil, errClosing
	}
	c, err := startChild(s.sp, s.out, tag, bin, args, env)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if at >= 0 && at < len(s.children) {
		s.children[at] = c
	} else {
		s.children = append(s.children, c)
	}
	s.mu.Unlock()
	go func() {
		<-c.done
		c.mu.Lock()
		expected := c.stopping
		c.mu.Unlock()
		if !expected && (onCrash == nil || !onCrash(c)) {
			s.die(c)
		}
	}()
	return c, nil
}

// die records c as the child whose exit stops everything.
func (s *supervisor) die(c *child) {
	s.deadOnce.Do(func() {
		s.mu.Lock()
		s.deadChild = c
		s.mu.Unlock()
		close(s.dead)
	})
}

// waitReady polls p until it passes, the child dies, ctx ends or
// ReadyTimeout passes, backing off so a slow start is not hammered.
func (s *supervisor) waitReady(ctx context.Context, c *child, what string, p probe) error {
	deadline := time.Now().Add(s.cfg.ReadyTimeout)
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		if err := s.stopped(ctx); err != nil {
			return err
		}
		// A probe in flight ends when a child dies, so a crash is reported
		// at once, not after the probe's own timeout.
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		go func() {
			select {
			case <-s.dead:
				cancel()
			case <-pctx.Done():
			}
		}()
		err := p(pctx)
		cancel()
		if err == nil {
			s.out.line("dev", fmt.Sprintf("%s is ready (pid %d, %s)", c.tag, c.pid(), time.Since(c.since).Round(time.Millisecond)))
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (pid %d) did not become ready within %s (%s: %v); last output:%s",
				c.tag, c.pid(), s.cfg.ReadyTimeout, what, err, c.tail)
		}
		select {
		case <-ctx.Done():
			return errInterrupted
		case <-s.dead:
			return s.crashErr()
		case <-time.After(wait):
		}
	}
}

func (s *supervisor) waitOnline(ctx context.Context, apiURL, token string) string {
	deadline := time.Now().Add(s.cfg.ReadyTimeout / 2)
	state := "unknown"
	for time.Now().Before(deadline) {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := nodeState(qctx, apiURL, token, s.cfg.NodeID)
		cancel()
		if err == nil {
			state = st
			if st == string(node.Online) {
				return state
			}
		}
		select {
		case <-ctx.Done():
			return state
		case <-s.dead:
			return state
		case <-time.After(250 * time.Millisecond):
		}
	}
	return state
}

// stopped says why start-up must end now (the user asked, or a child died),
// or nil to go on.
func (s *supervisor) stopped(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return errInterrupted
	case <-s.dead:
		return s.crashErr()
	default:
		return nil
	}
}

func (s *supervisor) interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errInterrupted
	}
	return err
}

func (s *supervisor) crashed() *child {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deadChild
}

func (s *supervisor) crashErr() error {
	c := s.crashed()
	return fmt.Errorf("%s (pid %d) exited unexpectedly with %s after %s; last output:%s",
		c.tag, c.pid(), describeExit(c.err), time.Since(c.since).Round(time.Millisecond), c.tail)
}

// stopAll stops the children in reverse start order, which is reverse
// dependency order: the worker deregisters its node through Temporal, and
// the apiserver may be mid-request, so Temporal and S3 go last.
func (s *supervisor) stopAll() error {
	s.mu.Lock()
	s.closing = true
	cs := append([]*child(nil), s.children...)
	s.mu.Unlock()
	var errs []error
	for i := len(cs) - 1; i >= 0; i-- {
		c := cs[i]
		if !c.exited() {
			s.out.line("dev", fmt.Sprintf("stopping %s (pid %d)", c.tag, c.pid()))
		}
		if err := c.stop(s.cfg.StopGrace); err != nil && c != s.crashed() {
			errs = append(errs, err)
		}
	}
	if len(cs) > 0 {
		s.out.line("dev", "all stopped")
	}
	return errors.Join(errs...)
}

func (s *supervisor) banner(st State, state string) {
	cfg := s.cfg
	home := cfg.Home
	env := config.DevEnvFile(home)
	api := "http://" + hostPort(cfg.APIPort)
	var pids []string
	s.mu.Lock()
	for _, c := range s.children {
		pids = append(pids, fmt.Sprintf("%s %d", c.tag, c.pid()))
	}
	replicas := replicaLines(s.replicas, s.children)
	s.mu.Unlock()
	apiMetrics := api + "/metrics"
	if len(s.replicas) > 0 {
		var ms []string
		for _, r := range s.replicas {
			ms = append(ms, "http://"+r.addr+"/metrics")
		}
		apiMetrics = strings.Join(ms, " , ")
	}
	nodeLine := fmt.Sprintf("node %s is %s", cfg.NodeID, state)
	if state != string(node.Online) {
		nodeLine += " (not Online yet: see the [worker] lines)"
	}
	s.out.printf(`
llorch dev is up (state in %s)
  REST API     %s   (token in %s: export $(grep %s %s))%s
  Temporal UI  http://%s/namespaces/default/workflows
  Temporal     %s
  S3           http://%s bucket %s
  metrics      %s , worker http://%s/metrics
  %s; pids: %s
try: curl -H "Authorization: Bearer $%s" %s/v2/nodes
add a node: %s worker --node-id node-2%s
stop: Ctrl-C

`, home, api, env, envToken, env, replicas, hostPort(cfg.UIPort), hostPort(cfg.TemporalPort), hostPort(cfg.S3Port), cfg.Bucket,
		apiMetrics, hostPort(cfg.WorkerMetricsPort), nodeLine, strings.Join(pids, ", "), envToken, api, displayPath(s.exe), homeHint(home))
}

// homeHint is the LLORCH_HOME a second worker needs when the state dir is
// not the default one it would find on its own.
func homeHint(home string) string {
	if home == config.Home() {
		return ""
	}
	abs, err := filepath.Abs(home)
	if err != nil {
		abs = home
	}
	return " --home " + abs
}

// displayPath shortens p relative to the working directory when it is below
// it (./bin/llorch), so the printed command can be pasted as is.
func displayPath(p string) string {
	wd, err := os.Getwd()
	if err != nil {
		return p
	}
	if rel, err := filepath.Rel(wd, p); err == nil && !strings.HasPrefix(rel, "..") {
		return "./" + rel
	}
	return p
}

// AuditLogFile is the file under the dev home the apiservers append the
// audit trail to (JSON lines; also on their stderr with stream=audit).
const AuditLogFile = "audit.log"
