package scheduler

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
)

// Sessions takes and gives back sessions' turns (control.Sessions). They
// live in Temporal, one workflow per session, so every replica counts the
// same turns.
type Sessions interface {
	Turn(ctx context.Context, sessionID string, turn session.TurnRequest) (session.TurnResult, error)
	Release(ctx context.Context, sessionID, taskID string) error
}

// SessionFullError refuses a task of a session that has had all its turns.
type SessionFullError struct{ SessionID string }

func (e *SessionFullError) Error() string {
	return fmt.Sprintf("session %s has had its %d turns; start a new session", e.SessionID, session.MaxTurns)
}

// errNoSessions refuses a session's task on a scheduler built without
// Sessions.
var errNoSessions = errors.New("this scheduler keeps no sessions")

// takeTurn takes req's turn in its session (none: no session, no round
// trip). Taken before the task's workflow starts, so the limit holds
// across replicas; giveBack returns it if the task then does not start.
func (s *Scheduler) takeTurn(ctx context.Context, req task.Request) (session.TurnResult, error) {
	if req.SessionID == "" {
		return session.TurnResult{}, nil
	}
	if s.Sessions == nil {
		return session.TurnResult{}, errNoSessions
	}
	r, err := s.Sessions.Turn(ctx, req.SessionID, session.TurnRequest{TaskID: req.TaskID, ModelID: req.ModelID, Owner: req.Owner})
	if errors.Is(err, control.ErrSessionFull) {
		return r, &SessionFullError{SessionID: req.SessionID}
	}
	return r, err
}

// giveBack returns a turn this admission took for a task that did not
// start; a turn the task already had (a retried admission) stays.
func (s *Scheduler) giveBack(ctx context.Context, req task.Request, r session.TurnResult) {
	if req.SessionID == "" || !r.New {
		return
	}
	// The client may have gone: the turn is still given back.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := s.Sessions.Release(ctx, req.SessionID, req.TaskID); err != nil && s.Log != nil {
		s.Log.Warn("a session keeps the turn of a task that did not start", "session_id", req.SessionID,
			"task_id", req.TaskID, "turn", r.Turn, "err", err)
	}
}
