package scheduler

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/prefix"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// TaskControl are the task workflow's steps on the control queue, served
// by the apiserver that holds the scheduler and the token hub.
type TaskControl struct {
	S       *Scheduler
	Hub     *tokenstream.Hub
	Metrics *Metrics
}

// PlaceInput asks for a slot.
type PlaceInput struct {
	TaskID     string
	ModelID    string
	Priority   task.Priority
	Placement  task.Placement
	Exclude    []string
	EnqueuedAt time.Time
	// NoPoolGrace: wait this long for a pool to come (back) before
	// failing with POOL_UNAVAILABLE (0: a few seconds).
	NoPoolGrace time.Duration
	// Prefix is the chain of the task's prompt: placement looks for the
	// pool whose slot caches hold it (nil in histories from before).
	Prefix []prefix.Link `json:",omitempty"`
}

// Place waits for a slot, heartbeating; a restarted apiserver's scheduler
// gets the task back when the activity is retried after the heartbeat
// timeout. No pool able to serve the task is a non-retryable
// POOL_UNAVAILABLE.
func (a *TaskControl) Place(ctx context.Context, in PlaceInput) (task.Where, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		last := ""
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
				activity.RecordHeartbeat(ctx)
				last = a.reportWaiting(in.TaskID, last)
			}
		}
	}()
	where, err := a.S.Wait(wctx, in.TaskID, in.Priority,
		placement.Request{ModelID: in.ModelID, Placement: in.Placement, Exclude: in.Exclude, NoPoolGrace: in.NoPoolGrace, Prefix: in.Prefix}, in.EnqueuedAt)
	switch {
	case errors.Is(err, placement.ErrNoPool):
		return where, temporal.NewNonRetryableApplicationError(err.Error(), task.ErrPoolUnavailable, nil)
	case errors.Is(err, ErrDropped):
		return where, temporal.NewNonRetryableApplicationError(err.Error(), task.ErrAdmissionReject, nil)
	}
	return where, err
}

// reportWaiting tells a queued task's stream where it stands (a metrics
// event) when that changed: its place in line and the state of its
// model's pools, so a client watches a pool being prepared.
func (a *TaskControl) reportWaiting(taskID, last string) string {
	if a.Hub == nil {
		return last
	}
	pos, pools, ok := a.S.Waiting(taskID)
	if !ok {
		return last
	}
	key := fmt.Sprint(pos, pools)
	if key == last {
		return last
	}
	_, _ = a.Hub.Stream(taskID).Push([]task.Event{{Type: "metrics", Metrics: map[string]any{
		"waiting": true, "queue_position": pos, "pools": pools}}})
	return key
}

// Granted is the answer of TryPlace.
type Granted struct {
	Where task.Where
	OK    bool
}

// TryPlace (a local activity: no server round trip) returns the slot the
// task was granted at admission, if any; else the workflow waits in Place.
func (a *TaskControl) TryPlace(_ context.Context, taskID string) (Granted, error) {
	w, ok := a.S.Granted(taskID)
	return Granted{Where: w, OK: ok}, nil
}

// ReleaseInput returns a slot.
type ReleaseInput struct {
	TaskID string
	PoolID string
	BusyMs int64
}

// Release returns a task's slot (idempotent; nothing after a restart).
func (a *TaskControl) Release(_ context.Context, in ReleaseInput) error {
	if in.PoolID == "" {
		a.S.Forget(in.TaskID)
		return nil
	}
	a.S.Release(in.TaskID, in.PoolID, time.Duration(in.BusyMs)*time.Millisecond)
	return nil
}

// StreamProgress is what the apiserver's stream holds of a task: the tokens
// its clients have seen, from which a generation moved off a lost node
// resumes.
func (a *TaskControl) StreamProgress(_ context.Context, taskID string) (task.Progress, error) {
	if a.Hub == nil {
		return task.Progress{}, nil
	}
	s := a.Hub.Peek(taskID)
	if s == nil {
		return task.Progress{}, nil
	}
	return s.Progress(), nil
}

// FinishInput is a task's outcome.
type FinishInput struct {
	TaskID string
	State  task.State
	Code   string
}

// Finished counts a task's outcome and forgets any ticket it left.
func (a *TaskControl) Finished(_ context.Context, in FinishInput) error {
	a.S.Forget(in.TaskID)
	a.Metrics.finished(in.State, in.Code)
	return nil
}
