package tokenstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/llorch/task"
)

// Follower feeds an apiserver replica's Hub from the nodes' links: one
// goroutine per task with a reader on this replica (or just admitted
// here), whichever replica admitted the task. It reads the task's status,
// subscribes to the generating node's stream from the tokens the local
// stream holds, and, when the node stream breaks, ends with an error, or
// is not there, reads the status again: the task may have moved to
// another node or ended, in which case the recorded result finishes the
// local stream.
type Follower struct {
	Hub *Hub
	// Status reads a task: its query while it runs, its result once ended
	// (control.Tasks.Status).
	Status func(ctx context.Context, taskID string) (st task.Status, running bool, err error)
	// LinkURL is where a node's link serves.
	LinkURL func(ctx context.Context, nodeID string) (string, error)
	// Subscribe hands each event of the node's stream of the task after
	// token index after to each, until the final event (link.Client.Events).
	Subscribe func(ctx context.Context, linkURL, taskID string, after int, each func(task.Event) error) error
	// SubscribeBatch, when set, is used instead of Subscribe: it hands
	// over the events of one read of the node's stream at once
	// (link.Client.EventBatches), which the local stream takes in one
	// push, waking its readers once per batch rather than per token.
	SubscribeBatch func(ctx context.Context, linkURL, taskID string, after int, each func([]task.Event) error) error
	// Ended, when set, is told that a task's stream got its end event (the
	// scheduler frees the slot without waiting for the workflow).
	Ended func(taskID string)
	// Seen, when set, is told what the local stream holds when a node's
	// stream breaks off mid-generation (control.Tasks.Seen), once per
	// generation: the workflow resumes a moved task from at least that.
	Seen func(ctx context.Context, taskID string, p task.Progress) error
	// Idle is how long a follower goes on with no reader attached; 0: 30 s.
	Idle time.Duration
	// Poll is how often a queued task's status is read again; 0: 250 ms.
	Poll    time.Duration
	Log     *slog.Logger
	Metrics *FollowMetrics

	mu     sync.Mutex
	tasks  map[string]*following
	ctx    context.Context
	cancel context.CancelFunc
}

// following is one task's follower; guarded by Follower.mu.
type following struct {
	st      *Stream // the local stream it feeds
	readers int
	cancel  context.CancelFunc
	idle    *time.Timer // armed while no reader is attached
}

// FollowMetrics are the followers' figures; nil: not counted.
type FollowMetrics struct {
	running prometheus.Gauge
	errors  *prometheus.CounterVec
}

// NewFollowMetrics registers the followers' metrics on reg.
func NewFollowMetrics(reg prometheus.Registerer) *FollowMetrics {
	m := &FollowMetrics{
		running: prometheus.NewGauge(prometheus.GaugeOpts{Name: "llorch_stream_followers",
			Help: "Tasks whose node stream this apiserver replica follows now."}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "llorch_stream_follow_errors_total",
			Help: "Failures following a task's stream, by step (status, link, subscribe, gap)."}, []string{"step"}),
	}
	reg.MustRegister(m.running, m.errors)
	return m
}

func (m *FollowMetrics) failed(step string) {
	if m != nil {
		m.errors.WithLabelValues(step).Inc()
	}
}

func (m *FollowMetrics) add(d float64) {
	if m != nil {
		m.running.Add(d)
	}
}

// Read attaches a reader to the task's local stream, starting its follower
// if none runs; release detaches it.
func (f *Follower) Read(taskID string) (st *Stream, release func()) {
	st = f.Hub.Stream(taskID)
	unread := st.Attach() // the hub keeps a stream with a reader
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.ensure(taskID, st, nil)
	if t == nil {
		return st, unread
	}
	t.readers++
	if t.idle != nil {
		t.idle.Stop()
		t.idle = nil
	}
	var once sync.Once
	return st, func() { once.Do(func() { unread(); f.detach(taskID, t) }) }
}

// Start follows a task just admitted on this replica, on the node its slot
// was granted on (where; nil: read from its status), so its first token
// does not wait for a status read. It stops after Idle unless a reader
// attaches.
func (f *Follower) Start(taskID string, where *task.Where) {
	st := f.Hub.Stream(taskID)
	f.mu.Lock()
	defer f.mu.Unlock()
	if t := f.ensure(taskID, st, where); t != nil && t.readers == 0 && t.idle == nil {
		f.armIdle(taskID, t)
	}
}

// Close stops every follower.
func (f *Follower) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cancel != nil {
		f.cancel()
	}
	f.ctx = closedCtx
}

var closedCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// ensure returns the task's follower, starting it; nil when the stream
// has ended (nothing to follow) or the Follower is closed. Called with
// f.mu held.
func (f *Follower) ensure(taskID string, st *Stream, where *task.Where) *following {
	if f.ctx == nil {
		f.ctx, f.cancel = context.WithCancel(context.Background())
	}
	if t := f.tasks[taskID]; t != nil && t.st == st {
		return t
	} else if t != nil {
		// The hub dropped the stream it fed (ended it) and holds a new
		// one: follow that one; the old follower stops on its own.
		t.cancel()
		if t.idle != nil {
			t.idle.Stop()
		}
		delete(f.tasks, taskID)
	}
	if st.Ended() || f.ctx.Err() != nil {
		return nil
	}
	if f.tasks == nil {
		f.tasks = map[string]*following{}
	}
	ctx, cancel := context.WithCancel(f.ctx)
	t := &following{st: st, cancel: cancel}
	f.tasks[taskID] = t
	f.Metrics.add(1)
	go func() {
		defer func() {
			cancel()
			f.mu.Lock()
			if f.tasks[taskID] == t {
				delete(f.tasks, taskID)
			}
			if t.idle != nil {
				t.idle.Stop()
			}
			f.mu.Unlock()
			f.Metrics.add(-1)
		}()
		f.run(ctx, taskID, st, where)
	}()
	return t
}

func (f *Follower) detach(taskID string, t *following) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t.readers--
	if t.readers == 0 && f.tasks[taskID] == t {
		f.armIdle(taskID, t)
	}
}

// armIdle stops the follower after Idle without a reader. Called with
// f.mu held.
func (f *Follower) armIdle(taskID string, t *following) {
	idle := f.Idle
	if idle <= 0 {
		idle = 30 * time.Second
	}
	t.idle = time.AfterFunc(idle, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if t.readers == 0 && f.tasks[taskID] == t {
			f.log().Debug("stream follower idle: stopping", "task_id", taskID)
			t.cancel()
		}
	})
}

func (f *Follower) log() *slog.Logger {
	if f.Log == nil {
		return slog.Default()
	}
	return f.Log
}

// errGap: the node stream starts above what the local stream holds.
var errGap = errors.New("the node's stream lacks tokens this replica has not seen")

// run feeds st until it has ended or ctx ends.
func (f *Follower) run(ctx context.Context, taskID string, st *Stream, where *task.Where) {
	poll := f.Poll
	if poll <= 0 {
		poll = 250 * time.Millisecond
	}
	const mostBackoff = 2 * time.Second
	backoff := poll
	log := f.log().With("task_id", taskID)
	key := ""
	if where != nil {
		key = whereKey(*where, 0)
	}
	dead := ""                      // the generation whose node stream ended with an error
	reported := ""                  // the generation whose break was told to the workflow
	metricsSeen := map[string]int{} // per generation: metrics taken already
	for ctx.Err() == nil && !st.Ended() {
		if where == nil {
			s, running, err := f.Status(ctx, taskID)
			var final *task.Error
			switch {
			case ctx.Err() != nil:
				return
			case errors.As(err, &final):
				// The task ended and its output cannot be read back (gone
				// from the bucket, or corrupt): that is the stream's end.
				st.Finish(task.Event{Type: "error", Error: final})
				return
			case err != nil:
				f.Metrics.failed("status")
				log.Debug("stream follower: cannot read the task's status", "err", err)
				sleep(ctx, backoff)
				backoff = min(2*backoff, mostBackoff)
				continue
			case !running || s.State == task.Completed || s.State == task.Failed || s.State == task.Canceled:
				FinishFromStatus(st, s)
				return
			case s.Where == nil || s.State != task.Running || whereKey(*s.Where, len(s.Migrations)) == dead:
				sleep(ctx, poll) // queued, moving, or about to end
				continue
			}
			where, key = s.Where, whereKey(*s.Where, len(s.Migrations))
		}
		nodeLog := log.With("node_id", where.NodeID, "pool_id", where.PoolID)
		url, err := f.LinkURL(ctx, where.NodeID)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			f.Metrics.failed("link")
			nodeLog.Warn("stream follower: no link URL for the task's node", "err", err)
			where = nil
			sleep(ctx, backoff)
			backoff = min(2*backoff, mostBackoff)
			continue
		}
		var nodeErr *task.Event
		startedPool, skip := "", metricsSeen[key]
		var take []task.Event
		batch := func(evs []task.Event) error {
			take = take[:0] // Push copies what it takes
			ended := false
			for _, ev := range evs {
				switch ev.Type {
				case "started":
					startedPool = ev.PoolID
				case "metrics":
					if skip > 0 { // taken on an earlier subscription
						skip--
						continue
					}
					metricsSeen[key]++
				case "error":
					// The workflow's record says what the task failed with
					// (a cancel, a deadline, a move elsewhere): read it.
					e := ev
					nodeErr = &e
					continue
				case "end":
					ended = true
				}
				take = append(take, ev)
			}
			if len(take) == 0 {
				return nil
			}
			if have, err := st.Push(take); err != nil {
				return fmt.Errorf("token %d: %w", gapAt(take, have), errGap)
			}
			if ended && f.Ended != nil {
				f.Ended(taskID)
			}
			return nil
		}
		if f.SubscribeBatch != nil {
			err = f.SubscribeBatch(ctx, url, taskID, st.Tokens()-1, batch)
		} else {
			one := make([]task.Event, 1)
			err = f.Subscribe(ctx, url, taskID, st.Tokens()-1, func(ev task.Event) error {
				one[0] = ev
				return batch(one)
			})
		}
		switch {
		case st.Ended() || ctx.Err() != nil:
			return
		case err == nil && nodeErr != nil:
			backoff = poll
			if startedPool == "" || startedPool == where.PoolID {
				dead = key
			}
			nodeLog.Debug("stream follower: node stream ended with an error; reading the task's status", "code", nodeErr.Error.Code)
		case err == nil:
			backoff = poll
		default:
			step := "subscribe"
			if errors.Is(err, errGap) {
				step = "gap"
			}
			f.Metrics.failed(step)
			nodeLog.Info("stream follower: node stream broke off; reading the task's status", "err", err, "have", st.Tokens())
			if f.Seen != nil && step == "subscribe" && reported != key && st.Tokens() > 0 {
				reported = key
				if err := f.Seen(ctx, taskID, st.Progress()); err != nil && ctx.Err() == nil {
					nodeLog.Warn("stream follower: cannot tell the workflow what readers saw", "err", err)
				}
			}
			sleep(ctx, backoff)
			backoff = min(2*backoff, mostBackoff)
		}
		where = nil
	}
}

// gapAt is the index of the first token in evs past have, the one a push
// that answered have refused as a gap.
func gapAt(evs []task.Event, have int) int {
	for _, ev := range evs {
		if ev.Type == "token" && ev.I > have {
			return ev.I
		}
	}
	return have
}

// whereKey names one generation of a task: its pool and epoch, and the
// moves before it.
func whereKey(w task.Where, moves int) string {
	return w.NodeID + "/" + w.PoolID + "/" + strconv.FormatInt(w.Epoch, 10) + "/" + strconv.Itoa(moves)
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// FinishFromStatus ends a stream from its task's recorded outcome: the
// tokens the stream lacks and end, or the error.
func FinishFromStatus(st *Stream, res task.Status) {
	if res.State != task.Completed {
		e := res.Error
		if e == nil {
			e = &task.Error{Code: "INTERNAL", Message: "task ended " + string(res.State)}
		}
		st.Finish(task.Event{Type: "error", Error: e})
		return
	}
	var evs []task.Event
	if res.Where != nil {
		evs = append(evs, task.Event{Type: "started", NodeID: res.Where.NodeID, PoolID: res.Where.PoolID})
	}
	for i := st.Tokens(); i < len(res.Pieces); i++ {
		evs = append(evs, task.Event{Type: "token", I: i, T: res.Pieces[i]})
	}
	evs = append(evs, task.Event{Type: "end", TokensOut: res.TokensOut, DecodeTimeMs: res.DecodeMs, TokensIn: res.TokensIn, StopType: res.StopType})
	_, _ = st.Push(evs)
}

// Running is how many tasks are followed now.
func (f *Follower) Running() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.tasks)
}
