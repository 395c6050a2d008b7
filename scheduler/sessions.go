package scheduler

import (
	"fmt"
	"sync"
	"time"
)

// Session limits from the original plan.
const (
	sessionTTL      = 10 * time.Minute
	SessionMaxTurns = 8
)

// Session is metadata only: which tasks made its turns. Prompts are not
// kept; a client sends its conversation with each task.
type Session struct {
	ID        string
	ModelID   string
	Turns     []string // task ids
	CreatedAt time.Time
	LastUsed  time.Time
	ExpiresAt time.Time
}

// SessionFullError refuses a task of a session that has had all its turns.
type SessionFullError struct{ SessionID string }

func (e *SessionFullError) Error() string {
	return fmt.Sprintf("session %s has had its %d turns; start a new session", e.SessionID, SessionMaxTurns)
}

type sessionTable struct {
	mu sync.Mutex
	m  map[string]*Session
}

func (t *sessionTable) gc(now time.Time) {
	for id, s := range t.m {
		if now.After(s.ExpiresAt) {
			delete(t.m, id)
		}
	}
}

// check refuses a session that has had all its turns.
func (t *sessionTable) check(id string) error {
	if id == "" {
		return nil
	}
	if s, ok := t.get(id); ok && len(s.Turns) >= SessionMaxTurns {
		return &SessionFullError{SessionID: id}
	}
	return nil
}

// turn records a task as a session's next turn (none: no session), unless
// a racing task took the last one.
func (t *sessionTable) turn(id, taskID, modelID string) {
	if id == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now().UTC()
	if t.m == nil {
		t.m = map[string]*Session{}
	}
	t.gc(now)
	s := t.m[id]
	if s == nil {
		s = &Session{ID: id, ModelID: modelID, CreatedAt: now}
		t.m[id] = s
	}
	if len(s.Turns) >= SessionMaxTurns {
		return
	}
	s.Turns = append(s.Turns, taskID)
	s.LastUsed, s.ExpiresAt = now, now.Add(sessionTTL)
}

func (t *sessionTable) get(id string) (Session, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gc(time.Now())
	s, ok := t.m[id]
	if !ok {
		return Session{}, false
	}
	return *s, true
}

func (t *sessionTable) remove(id string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gc(time.Now())
	_, ok := t.m[id]
	delete(t.m, id)
	return ok
}

// Session reads a session that has not expired.
func (s *Scheduler) Session(id string) (Session, bool) { return s.sessions.get(id) }

// EndSession forgets a session; false if there was none.
func (s *Scheduler) EndSession(id string) bool { return s.sessions.remove(id) }
