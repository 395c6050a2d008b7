package workflows

import (
	"fmt"
	"slices"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	// Aliased: the package's node tests have a helper named sess.
	sess "github.com/llorch/llorch/session"
)

// Session holds one session's turns: which tasks took them, in order, and
// when the session expires. Every apiserver replica takes turns through its
// turn update (update-with-start), so the limit of sess.MaxTurns is
// counted in one place. It ends sess.TTL after its last turn, when it is
// ended, or when a release leaves it without a turn; a later turn starts a
// fresh one under the same id. At most MaxTurns turns (and as many
// releases) bound its history: no continue-as-new.
func Session(ctx workflow.Context, in sess.Input) (sess.Info, error) {
	now := workflow.Now(ctx)
	s := &sessionWF{info: sess.Info{SessionID: in.SessionID, TaskIDs: []string{}, CreatedAt: now, ExpiresAt: now.Add(sess.TTL)}}
	if err := workflow.SetQueryHandler(ctx, sess.QueryInfo, func() (sess.Info, error) { return s.info, nil }); err != nil {
		return s.info, err
	}
	for _, u := range []struct {
		name      string
		handler   any
		validator any
	}{
		{sess.UpdateTurn, s.onTurn, s.validateTurn},
		{sess.UpdateRelease, s.onRelease, s.validateRelease},
		{sess.UpdateEnd, s.onEnd, nil},
	} {
		if err := workflow.SetUpdateHandlerWithOptions(ctx, u.name, u.handler, workflow.UpdateHandlerOptions{Validator: u.validator}); err != nil {
			return s.info, err
		}
	}
	s.details(ctx)
	if err := s.run(ctx); err != nil {
		return s.info, err
	}
	workflow.GetLogger(ctx).Info("session closed", "session_id", in.SessionID, "turns", len(s.info.TaskIDs), "why", s.why)
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**closed** (%s) after %d of %d turns", s.why, len(s.info.TaskIDs), sess.MaxTurns))
	return s.info, nil
}

type sessionWF struct {
	info    sess.Info
	changed bool   // a turn or release since run last looked
	closing bool   // run decided to close: turns go to a fresh session
	end     string // why the session closes before its expiry ("" while open)
	why     string // why it closed
}

// run waits for the expiry, moved by every turn, or for an end.
func (s *sessionWF) run(ctx workflow.Context) error {
	for {
		s.changed = false
		left := s.info.ExpiresAt.Sub(workflow.Now(ctx))
		expired := left <= 0
		if !expired {
			// Its own timer, canceled when a turn moves the expiry
			// (AwaitWithTimeout would leave each one pending).
			tctx, cancel := workflow.WithCancel(ctx)
			timer := workflow.NewTimerWithOptions(tctx, left, workflow.TimerOptions{Summary: "session expiry"})
			err := workflow.Await(ctx, func() bool { return s.changed || s.end != "" || timer.IsReady() })
			expired = timer.IsReady()
			cancel()
			if err != nil {
				return err
			}
		}
		if s.changed && s.end == "" {
			continue // a turn in the same task as the timer keeps the session
		}
		// Handlers never block, but a turn accepted now must finish before
		// the run closes.
		if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
			return err
		}
		if s.changed && s.end == "" {
			continue
		}
		s.closing = true
		if s.why = s.end; expired && s.why == "" {
			s.why = fmt.Sprintf("expired %s after its last turn", sess.TTL)
		}
		return nil
	}
}

func (s *sessionWF) validateTurn(ctx workflow.Context, r sess.TurnRequest) error {
	if err := r.Validate(); err != nil {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("session %s: %v", s.info.SessionID, err), sess.ErrInvalid, nil)
	}
	if s.closing || s.end != "" {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("session %s is closing; a new turn starts a fresh session", s.info.SessionID), sess.ErrEnded, nil)
	}
	if !slices.Contains(s.info.TaskIDs, r.TaskID) && len(s.info.TaskIDs) >= sess.MaxTurns {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("session %s has had its %d turns; start a new session", s.info.SessionID, sess.MaxTurns), sess.ErrTurnLimit, nil)
	}
	return nil
}

// onTurn appends the task as the next turn; a task that has its turn gets
// the same one back (a retried admission).
func (s *sessionWF) onTurn(ctx workflow.Context, r sess.TurnRequest) (sess.TurnResult, error) {
	if i := slices.Index(s.info.TaskIDs, r.TaskID); i >= 0 {
		return sess.TurnResult{Turn: i + 1}, nil
	}
	if err := s.validateTurn(ctx, r); err != nil {
		return sess.TurnResult{}, err // validated moments ago; kept for safety
	}
	now := workflow.Now(ctx)
	if len(s.info.TaskIDs) == 0 {
		s.info.ModelID = r.ModelID
	}
	s.info.TaskIDs = append(s.info.TaskIDs, r.TaskID)
	s.info.LastUsed, s.info.ExpiresAt = now, now.Add(sess.TTL)
	s.changed = true
	n := len(s.info.TaskIDs)
	workflow.GetLogger(ctx).Info("session turn taken", "session_id", s.info.SessionID, "task_id", r.TaskID, "turn", n)
	s.details(ctx)
	return sess.TurnResult{Turn: n, New: true}, nil
}

func (s *sessionWF) validateRelease(ctx workflow.Context, r sess.ReleaseRequest) error {
	if err := r.Validate(); err != nil {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("session %s: %v", s.info.SessionID, err), sess.ErrInvalid, nil)
	}
	return nil
}

// onRelease gives back the turn of a task whose workflow did not start. A
// session left with no turn never served a task: it closes.
func (s *sessionWF) onRelease(ctx workflow.Context, r sess.ReleaseRequest) error {
	i := slices.Index(s.info.TaskIDs, r.TaskID)
	if i < 0 {
		return nil
	}
	s.info.TaskIDs = slices.Delete(s.info.TaskIDs, i, i+1)
	s.changed = true
	if len(s.info.TaskIDs) == 0 && s.end == "" {
		s.end = "its only turn was given back"
	}
	workflow.GetLogger(ctx).Info("session turn given back", "session_id", s.info.SessionID, "task_id", r.TaskID, "turns", len(s.info.TaskIDs))
	s.details(ctx)
	return nil
}

func (s *sessionWF) onEnd(ctx workflow.Context, r sess.EndRequest) error {
	recordActor(ctx, r.Actor, "end")
	if s.end == "" {
		s.end = "ended by a client"
	}
	return nil
}

func (s *sessionWF) details(ctx workflow.Context) {
	workflow.SetCurrentDetails(ctx, "**open** "+s.info.Summary())
}
