package scheduler

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

// fastStarter records the generations sent ahead and called off; err fails
// the sending.
type fastStarter struct {
	mu       sync.Mutex
	sent     []task.Request
	canceled []string
	err      error
}

func (f *fastStarter) Start(_ context.Context, req task.Request) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, req)
	return f.err
}

func (f *fastStarter) Cancel(_ context.Context, _ task.Where, id, _ string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.canceled = append(f.canceled, id)
	return nil
}

func (f *fastStarter) calls() (int, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.sent), append([]string(nil), f.canceled...)
}

// A task granted a slot is sent to its node with the slot in the request,
// the same request its workflow starts with; a task with no Ready pool is
// not. A start that fails calls the generation off and leaves no ticket;
// AdmitAhead returns before the start and Durable reports it.
func TestFastStart(t *testing.T) {
	st, fs := &starter{}, &fastStarter{}
	s := &Scheduler{Source: oneSlot(true), Tasks: st, FastStart: fs}
	s.refresh(context.Background())
	adm, err := s.Admit(context.Background(), taskReq("a"))
	require.NoError(t, err)
	require.True(t, adm.FastStart)
	require.NoError(t, adm.Durable(context.Background()))
	testWait(t, func() bool { n, _ := fs.calls(); return n == 1 })
	fs.mu.Lock()
	w, ok := s.Granted("a")
	require.True(t, ok)
	require.Equal(t, &w, fs.sent[0].FastStart, "the node is told the granted slot")
	fs.mu.Unlock()

	failed := errors.New("temporal unavailable")
	s2 := &Scheduler{Source: oneSlot(true), Tasks: &starter{err: failed}, FastStart: fs}
	s2.refresh(context.Background())
	_, err = s2.Admit(context.Background(), taskReq("b"))
	require.ErrorIs(t, err, failed)
	testWait(t, func() bool { _, c := fs.calls(); return len(c) == 1 && c[0] == "b" })
	s2.mu.Lock()
	require.Empty(t, s2.tickets, "a start that failed leaves no ticket")
	s2.mu.Unlock()

	s3 := &Scheduler{Source: oneSlot(true), Tasks: &starter{err: failed}, FastStart: fs}
	s3.refresh(context.Background())
	first := make(chan struct{})
	close(first)
	adm, err = s3.AdmitAhead(context.Background(), taskReq("c"), first)
	require.NoError(t, err, "AdmitAhead does not wait for the start")
	require.ErrorIs(t, adm.Durable(context.Background()), failed)
	require.ErrorIs(t, adm.Durable(context.Background()), failed, "every waiter is told")
	testWait(t, func() bool { _, c := fs.calls(); return len(c) == 2 })

	// No Ready pool (one starting): nothing goes ahead, the workflow
	// places the task.
	s4 := &Scheduler{Source: oneSlot(false), Tasks: &starter{}, FastStart: fs}
	s4.refresh(context.Background())
	adm, err = s4.Admit(context.Background(), taskReq("d"))
	require.NoError(t, err)
	require.False(t, adm.FastStart)
	n, _ := fs.calls()
	require.Equal(t, 3, n)
}

func testWait(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		require.True(t, time.Now().Before(deadline), "condition never held")
		time.Sleep(time.Millisecond)
	}
}
