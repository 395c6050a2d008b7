package devcluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/llorch/balancer"
)

// replica is one of N apiservers behind the balancer.
type replica struct {
	i, n      int // 1-based number, of n
	addr      string
	args, env []string
	slot      int           // its place in the supervisor's children
	backoff   time.Duration // before the next restart
}

func (r *replica) tag() string { return "apiserver-" + strconv.Itoa(r.i) }

// startReplicas runs cfg.APIServers apiservers on free loopback ports and
// the balancer on apiAddr in this process. The balancer is not a child: it
// is a few lines of the standard library that must live exactly as long as
// llorch dev, and in production a Kubernetes Service or nginx stands in for
// it, so running it as its own process would prove nothing more.
func (s *supervisor) startReplicas(ctx context.Context, exe, apiAddr string, common, env []string) error {
	n := s.cfg.APIServers
	// Bind the API port before picking the replicas' ports: a port taken
	// since CheckPorts fails here, before any replica starts.
	ln, err := net.Listen("tcp", apiAddr)
	if err != nil {
		return fmt.Errorf("port %d (REST API) is in use: pick another with --api-port (%v)", s.cfg.APIPort, errors.Unwrap(err))
	}
	addrs, err := freeLoopbackPorts(n, s.cfg.ports())
	if err != nil {
		ln.Close()
		return err
	}
	var urls []string
	for i, addr := range addrs {
		r := &replica{i: i + 1, n: n, addr: addr, env: env, backoff: time.Second,
			args: append([]string{"apiserver", "--addr", addr, "--auto-pools"}, common...)}
		s.mu.Lock()
		r.slot = len(s.children)
		s.mu.Unlock()
		if _, err := s.startReplica(ctx, r); err != nil {
			ln.Close()
			return err
		}
		s.replicas = append(s.replicas, r)
		urls = append(urls, "http://"+addr)
	}
	for _, r := range s.replicas {
		c := s.replicaChild(r)
		if err := s.waitReady(ctx, c, "GET /health", httpOK("http://"+r.addr+"/health")); err != nil {
			ln.Close()
			return err
		}
		s.out.line("dev", fmt.Sprintf("apiserver replica %d/%d pid %d on %s", r.i, r.n, c.pid(), r.addr))
	}
	bal, err := balancer.New(urls, balancer.Options{
		HealthInterval: time.Second,
		Logger:         slog.New(slog.NewTextHandler(lineWriter{s.out, "balancer"}, nil)),
	})
	if err != nil {
		ln.Close()
		return err
	}
	go bal.Watch(ctx)
	s.lb = &http.Server{Handler: bal, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = s.lb.Serve(ln) }()
	s.out.line("dev", fmt.Sprintf("balancer on %s: round-robin over %d apiserver replicas", apiAddr, n))
	return nil
}

func (s *supervisor) startReplica(ctx context.Context, r *replica) (*child, error) {
	return s.spawn(r.slot, r.tag(), s.exe, r.args, r.env, func(c *child) bool { return s.restartReplica(ctx, r, c) })
}

func (s *supervisor) replicaChild(r *replica) *child {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.children[r.slot]
}

// restartReplica takes over the unexpected exit of replica r (child c):
// once the cluster is up, the other replicas keep serving and r is started
// again on its address, so `kill -9` of one replica is a demo, not the end
// of llorch dev. It backs off from 1 s to 30 s while r keeps dying young.
func (s *supervisor) restartReplica(ctx context.Context, r *replica, c *child) bool {
	if !s.restartReplicas.Load() || ctx.Err() != nil {
		return false // during start-up a dying replica is a broken setup
	}
	if time.Since(c.since) > time.Minute {
		r.backoff = time.Second
	}
	wait := r.backoff
	r.backoff = min(2*r.backoff, 30*time.Second)
	s.out.line("dev", fmt.Sprintf("apiserver replica %d/%d (pid %d on %s) exited with %s; the others keep serving; restarting it in %s",
		r.i, r.n, c.pid(), r.addr, describeExit(c.err), wait))
	go func() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		nc, err := s.startReplica(ctx, r)
		switch {
		case errors.Is(err, errClosing):
		case err != nil:
			s.out.line("dev", fmt.Sprintf("apiserver replica %d/%d: restart failed: %v", r.i, r.n, err))
			s.die(c)
		default:
			s.out.line("dev", fmt.Sprintf("apiserver replica %d/%d restarted: pid %d on %s", r.i, r.n, nc.pid(), r.addr))
		}
	}()
	return true
}

// freeLoopbackPorts picks n ports the kernel has free now, none of the
// configured ones (those not bound yet, as the worker's metrics port).
func freeLoopbackPorts(n int, taken []port) ([]string, error) {
	avoid := map[int]bool{}
	for _, p := range taken {
		avoid[p.n] = true
	}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var out []string
	for len(out) < n && len(lns) < n+len(taken)+8 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port for an apiserver replica: %w", err)
		}
		lns = append(lns, ln) // held until all are picked: no port twice
		if p := ln.Addr().(*net.TCPAddr).Port; !avoid[p] {
			out = append(out, ln.Addr().String())
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("found %d free ports for %d apiserver replicas", len(out), n)
	}
	return out, nil
}

// lineWriter feeds a logger's lines into the dev output under tag.
type lineWriter struct {
	out *syncWriter
	tag string
}

func (w lineWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		w.out.line(w.tag, l)
	}
	return len(p), nil
}

// replicaLines are the banner's lines on the replicas (under s.mu).
func replicaLines(rs []*replica, children []*child) string {
	var b strings.Builder
	if len(rs) > 0 {
		fmt.Fprintf(&b, "\n  balancer     round-robin over %d apiserver replicas on the REST API port; a killed one is restarted", len(rs))
	}
	for _, r := range rs {
		fmt.Fprintf(&b, "\n    apiserver replica %d/%d pid %d on http://%s", r.i, r.n, children[r.slot].pid(), r.addr)
	}
	return b.String()
}
