package scheduler

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
)

// starter records the workflows Admit starts; err fails them.
type starter struct {
	started []string
	err     error
}

func (s *starter) Start(_ context.Context, req task.Request) error {
	if s.err != nil {
		return s.err
	}
	s.started = append(s.started, req.TaskID)
	return nil
}

type creator struct{ specs []pool.Spec }

func (c *creator) Create(_ context.Context, s pool.Spec) (string, error) {
	c.specs = append(c.specs, s)
	return "run", nil
}

type nodes []control.NodeView

func (n nodes) List(context.Context) ([]control.NodeView, error) { return n, nil }

func nodeView(id string, st node.State, diskFree uint64) control.NodeView {
	return control.NodeView{Status: node.Status{NodeID: id, State: st, LastSnapshot: node.Snapshot{DiskFreeBytes: diskFree}}}
}

func taskReq(id string) task.Request {
	return task.Request{TaskID: id, ModelID: "m", Priority: task.Interactive, EnqueuedAt: time.Now()}
}

func noPools(context.Context) ([]placement.Candidate, error) { return nil, nil }

func TestAdmitStartsTheWorkflow(t *testing.T) {
	st := &starter{}
	reads := 0
	s := &Scheduler{Tasks: st, Source: func(ctx context.Context) ([]placement.Candidate, error) {
		if reads++; reads == 1 {
			return nil, nil // before the pool was created
		}
		return oneSlot(true)(ctx)
	}}
	s.refresh(context.Background())
	adm, err := s.Admit(context.Background(), taskReq("a"))
	require.NoError(t, err, "a snapshot without the pool is read again before refusing")
	require.Zero(t, adm.Position)
	require.Nil(t, adm.Prepared)
	require.Equal(t, []string{"a"}, st.started)
	where, ok := s.Granted("a")
	require.True(t, ok, "a free slot is granted at admission")
	require.Equal(t, "p", where.PoolID)
}

func TestAdmitRefusals(t *testing.T) {
	st := &starter{}
	s := &Scheduler{Source: noPools, Tasks: st, AutoPools: &AutoPools{Pools: &creator{}, Nodes: nodes{}}}
	s.refresh(context.Background())
	_, err := s.Admit(context.Background(), taskReq("a"))
	var np *NoPoolError
	require.ErrorAs(t, err, &np)
	require.ErrorContains(t, err, "no pool can serve model m: no Online node to start a pool for m on")

	s.AutoPools = nil
	_, err = s.Admit(context.Background(), taskReq("a"))
	require.ErrorIs(t, err, placement.ErrNoPool)
	require.EqualError(t, err, "no pool can serve model m: no pool serves the model: m")

	s = &Scheduler{Source: oneSlot(true), Tasks: st, Capacity: 1}
	s.refresh(context.Background())
	_, err = s.Admit(context.Background(), taskReq("a")) // takes the slot
	require.NoError(t, err)
	_, err = s.Admit(context.Background(), taskReq("b")) // waits
	require.NoError(t, err)
	_, err = s.Admit(context.Background(), taskReq("c"))
	var full *QueueFullError
	require.ErrorAs(t, err, &full)
	require.ErrorIs(t, err, ErrQueueFull)
	require.Equal(t, time.Second, full.Backoff, "no service observed yet")
	require.EqualError(t, err, "the interactive queue is full; retry after 1000 ms")
	require.Equal(t, []string{"a", "b"}, st.started)
}

// A workflow that cannot start leaves no queued ticket to hold a place.
func TestAdmitForgetsAFailedStart(t *testing.T) {
	s := &Scheduler{Source: oneSlot(false), Tasks: &starter{err: control.ErrTaskExists}}
	s.refresh(context.Background())
	_, err := s.Admit(context.Background(), taskReq("a"))
	require.ErrorIs(t, err, control.ErrTaskExists)
	s.mu.Lock()
	require.Empty(t, s.tickets)
	require.Empty(t, s.queues[task.Interactive])
	s.mu.Unlock()
}

// onceStarter starts a task id once, as Temporal does: again is
// ErrTaskExists.
type onceStarter struct{ started map[string]bool }

func (o *onceStarter) Start(_ context.Context, req task.Request) error {
	if o.started[req.TaskID] {
		return control.ErrTaskExists
	}
	o.started[req.TaskID] = true
	return nil
}

// A client retrying POST /v2/tasks with the same task_id gets
// ErrTaskExists and leaves the original's ticket (queued, or granted and
// pending) where it was.
func TestAdmitRetryKeepsTheOriginal(t *testing.T) {
	for _, ready := range []bool{false, true} {
		s := &Scheduler{Source: oneSlot(ready), Tasks: &onceStarter{started: map[string]bool{}}}
		s.refresh(context.Background())
		_, err := s.Admit(context.Background(), taskReq("a"))
		require.NoError(t, err)
		_, granted := s.Granted("a")
		require.Equal(t, ready, granted, "a ready pool's free slot is granted at admission")
		s.mu.Lock()
		orig := s.tickets["a"]
		s.mu.Unlock()
		require.NotNil(t, orig)

		_, err = s.Admit(context.Background(), taskReq("a"))
		require.ErrorIs(t, err, control.ErrTaskExists)
		s.mu.Lock()
		require.Same(t, orig, s.tickets["a"], "the original's ticket survives a retry (ready=%v)", ready)
		if !ready {
			require.Equal(t, []*ticket{orig}, s.queues[task.Interactive], "still queued")
		} else {
			require.True(t, orig.pending, "its dispatch still pending")
		}
		s.mu.Unlock()
		_, stillGranted := s.Granted("a")
		require.Equal(t, granted, stillGranted)
	}
}

// turns is a session store for admission tests: the workflow's rules
// (workflows/session_test.go tests the workflow itself).
type turns struct {
	tasks    map[string][]string
	released []string
}

func (f *turns) Turn(_ context.Context, sessionID string, turn session.TurnRequest) (session.TurnResult, error) {
	taskID := turn.TaskID
	if f.tasks == nil {
		f.tasks = map[string][]string{}
	}
	if i := slices.Index(f.tasks[sessionID], taskID); i >= 0 {
		return session.TurnResult{Turn: i + 1}, nil
	}
	if len(f.tasks[sessionID]) >= session.MaxTurns {
		return session.TurnResult{}, fmt.Errorf("%w: session %s", control.ErrSessionFull, sessionID)
	}
	f.tasks[sessionID] = append(f.tasks[sessionID], taskID)
	return session.TurnResult{Turn: len(f.tasks[sessionID]), New: true}, nil
}

func (f *turns) Release(_ context.Context, sessionID, taskID string) error {
	f.released = append(f.released, taskID)
	f.tasks[sessionID] = slices.DeleteFunc(f.tasks[sessionID], func(id string) bool { return id == taskID })
	return nil
}

// A session's turn is taken before its task starts and given back when the
// task does not start; a refused turn starts nothing and queues nothing.
func TestAdmitSessionTurns(t *testing.T) {
	st, ss := &starter{}, &turns{}
	s := &Scheduler{Source: oneSlot(true), Tasks: st, Sessions: ss}
	s.refresh(context.Background())
	for i := range session.MaxTurns {
		req := taskReq(fmt.Sprint("t", i))
		req.SessionID = "sess"
		_, err := s.Admit(context.Background(), req)
		require.NoError(t, err)
	}
	require.Len(t, ss.tasks["sess"], session.MaxTurns)
	req := taskReq("over")
	req.SessionID = "sess"
	_, err := s.Admit(context.Background(), req)
	var sf *SessionFullError
	require.ErrorAs(t, err, &sf)
	require.EqualError(t, err, "session sess has had its 8 turns; start a new session")
	require.NotContains(t, st.started, "over")
	s.mu.Lock()
	require.NotContains(t, s.tickets, "over", "a refused turn leaves no ticket")
	s.mu.Unlock()

	// A retried admission of a task with a turn keeps that turn.
	s.Tasks = &starter{err: control.ErrTaskExists}
	req = taskReq("t0")
	req.SessionID = "sess"
	_, err = s.Admit(context.Background(), req)
	require.ErrorIs(t, err, control.ErrTaskExists)
	require.Empty(t, ss.released)
	// A new task that cannot start gives its turn back.
	req = taskReq("other")
	req.SessionID = "s2"
	_, err = s.Admit(context.Background(), req)
	require.ErrorIs(t, err, control.ErrTaskExists)
	require.Equal(t, []string{"other"}, ss.released)
	require.Empty(t, ss.tasks["s2"])

	// Without Sessions a session's task is refused, not run sessionless.
	s = &Scheduler{Source: oneSlot(true), Tasks: st}
	s.refresh(context.Background())
	_, err = s.Admit(context.Background(), req)
	require.ErrorIs(t, err, errNoSessions)
}

// A turn taken for a task its queue has no room for is given back.
func TestAdmitQueueFullGivesTheTurnBack(t *testing.T) {
	ss := &turns{}
	s := &Scheduler{Source: oneSlot(false), Tasks: &starter{}, Sessions: ss, Capacity: 1}
	s.refresh(context.Background())
	_, err := s.Admit(context.Background(), taskReq("a"))
	require.NoError(t, err)
	req := taskReq("b")
	req.SessionID = "sess"
	_, err = s.Admit(context.Background(), req)
	require.ErrorIs(t, err, ErrQueueFull)
	require.Equal(t, []string{"b"}, ss.released)
}

func TestAdmitStartsAPool(t *testing.T) {
	cr := &creator{}
	st := &starter{}
	s := &Scheduler{Source: noPools, Tasks: st, AutoPools: &AutoPools{Pools: cr, Slots: 2, Ctx: 4096,
		Nodes: nodes{nodeView("small", node.Online, 10), nodeView("big", node.Online, 100), nodeView("off", node.Offline, 1000)}}}
	s.refresh(context.Background())
	adm, err := s.Admit(context.Background(), taskReq("a"))
	require.NoError(t, err)
	want := pool.Spec{PoolID: "auto-m-big", NodeID: "big", ModelID: "m", Engine: pool.Builtin, Slots: 2, CtxSize: 4096}
	require.Equal(t, &want, adm.Prepared, "on the Online node with the most free disk")
	require.Equal(t, []pool.Spec{want}, cr.specs)
	require.Equal(t, []string{"a"}, st.started)
	_, pools, ok := s.Waiting("a")
	require.True(t, ok, "the task waits for the announced pool")
	require.Equal(t, []PoolState{{PoolID: "auto-m-big", NodeID: "big", State: pool.Starting}}, pools)

	// A node named by the placement is used; a pinned task starts nothing.
	req := taskReq("b")
	req.Placement.NodeID = "small"
	req.ModelID = "other"
	adm, err = s.Admit(context.Background(), req)
	require.NoError(t, err)
	require.Equal(t, "small", adm.Prepared.NodeID)
	req = taskReq("c")
	req.ModelID = "pinned"
	req.Placement = task.Placement{Mode: "pin", PinPoolID: "p1"}
	adm, err = s.Admit(context.Background(), req)
	require.ErrorIs(t, err, placement.ErrNoPool)
	require.Nil(t, adm.Prepared)
	require.Len(t, cr.specs, 2)
}

func TestAutoPoolID(t *testing.T) {
	require.Equal(t, "auto-llama-3.1_8b-gpu-1", autoPoolID("Llama-3.1_8B", "gpu-1"))
	require.Equal(t, "auto-a-b-n", autoPoolID("a/b", "n"))
	long := autoPoolID(string(make([]byte, 80))+"m", "n")
	require.NoError(t, pool.ValidateID(long))
	require.Len(t, long, 63)
}
