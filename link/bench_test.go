package link

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// BenchmarkTaskStream streams tokens node hub -> link server -> link
// client -> replica hub -> a reader, as a replica follows a generation,
// with the producer paced like an engine. It reports the process's CPU
// (user+sys, getrusage) per token, the figure issue 13 bounds.
func BenchmarkTaskStream(b *testing.B) {
	for _, rate := range []int{1400, 5000} {
		// flush=0,each: a write per read and a push per event, as before
		// issue 13; flush=5ms,batch: as the link and follower run now.
		for _, mode := range []struct {
			flush time.Duration
			batch bool
		}{{0, false}, {0, true}, {node.LinkFlushInterval, true}} {
			each := map[bool]string{false: "each", true: "batch"}[mode.batch]
			b.Run(fmt.Sprintf("tok_s=%d/flush=%s,%s", rate, mode.flush, each), func(b *testing.B) {
				benchTaskStream(b, rate, 256, mode.flush, mode.batch)
			})
		}
	}
	// The floor: the paced producer alone, no subscriber.
	b.Run("producer_only", func(b *testing.B) {
		hub := &tokenstream.Hub{}
		var cpu time.Duration
		for n := range b.N {
			st := hub.Open(fmt.Sprintf("t%d", n), 0)
			before := rusage()
			produce(st, 1400, 256)
			cpu += rusage() - before
		}
		b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N*256), "cpu-ns/token")
	})
}

// produce pushes tokens at rate, as an engine streams them, then the end.
func produce(st *tokenstream.Stream, rate, tokens int) {
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	_, _ = st.Push([]task.Event{{Type: "started", NodeID: "n1", PoolID: "p1"}})
	for i := range tokens {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		_, _ = st.Push([]task.Event{{Type: "token", I: i, T: " tok", Tok: int32(i)}})
	}
	st.Finish(task.Event{Type: "end", TokensOut: tokens})
}

func benchTaskStream(b *testing.B, rate, tokens int, flush time.Duration, batch bool) {
	hub := &tokenstream.Hub{}
	f := serveB(b, Options{Token: token, Streams: hub})
	f.srv.flushInterval = flush
	replica := &tokenstream.Hub{}
	var cpu time.Duration
	b.ResetTimer()
	for n := range b.N {
		id := fmt.Sprintf("t%d", n)
		st := hub.Open(id, 0)
		local := replica.Stream(id)
		read := make(chan int, 1)
		go func() { // an SSE reader of the replica's stream
			cur, got := tokenstream.Cursor{}, 0
			for !cur.Done {
				evs, next, changed := local.Read(cur)
				cur, got = next, got+len(evs)
				if !cur.Done {
					<-changed
				}
			}
			read <- got
		}()
		errs := make(chan error, 1)
		go func() {
			if batch {
				errs <- f.client().EventBatches(context.Background(), id, -1, func(evs []task.Event) error {
					_, err := local.Push(evs)
					return err
				})
				return
			}
			errs <- f.client().Events(context.Background(), id, -1, func(ev task.Event) error {
				_, err := local.Push([]task.Event{ev})
				return err
			})
		}()
		before := rusage()
		produce(st, rate, tokens)
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
		if got := <-read; got != tokens+2 {
			b.Fatalf("the reader got %d events, want %d", got, tokens+2)
		}
		cpu += rusage() - before
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N*tokens), "cpu-ns/token")
}

func rusage() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// serveB is serve for a benchmark.
func serveB(b *testing.B, opts Options) *fixture {
	f := &fixture{src: NewSource("n1")}
	f.srv = NewServer(f.src, opts)
	if err := f.srv.Listen("127.0.0.1:0"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.srv.Shutdown(context.Background()) })
	f.url = URL("", f.srv.Addr())
	return f
}
