package apiserver

import (
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/task"
)

// Session limits from the original plan.
const (
	sessionTTL      = 10 * time.Minute
	sessionMaxTurns = 8
)

// CodeSessionNotFound and CodeSessionFull are session errors.
const (
	CodeSessionNotFound = "SESSION_NOT_FOUND"
	CodeSessionFull     = "SESSION_TURN_LIMIT"
)

// session is metadata only: which tasks made its turns. Prompts are not
// kept; a client sends its conversation with each task.
type session struct {
	ID        string    `json:"session_id"`
	ModelID   string    `json:"model_id"`
	Turns     []string  `json:"task_ids"`
	CreatedAt time.Time `json:"created_at"`
	LastUsed  time.Time `json:"last_used"`
	ExpiresAt time.Time `json:"expires_at"`
}

type sessionTable struct {
	mu sync.Mutex
	m  map[string]*session
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
	if s, ok := t.get(id); ok && len(s.Turns) >= sessionMaxTurns {
		return apiError(fiber.StatusConflict, CodeSessionFull, "session %s has had its %d turns; start a new session", id, sessionMaxTurns)
	}
	return nil
}

// turn records a task as a session's next turn (none: no session).
func (t *sessionTable) turn(id, taskID, modelID string) error {
	if id == "" {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now().UTC()
	if t.m == nil {
		t.m = map[string]*session{}
	}
	t.gc(now)
	s := t.m[id]
	if s == nil {
		s = &session{ID: id, ModelID: modelID, CreatedAt: now}
		t.m[id] = s
	}
	if len(s.Turns) >= sessionMaxTurns {
		return apiError(fiber.StatusConflict, CodeSessionFull, "session %s has had its %d turns; start a new session", id, sessionMaxTurns)
	}
	s.Turns = append(s.Turns, taskID)
	s.LastUsed, s.ExpiresAt = now, now.Add(sessionTTL)
	return nil
}

func (t *sessionTable) get(id string) (session, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gc(time.Now())
	s, ok := t.m[id]
	if !ok {
		return session{}, false
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

func (s *Server) getSession(c *fiber.Ctx) error {
	id := c.Params("id")
	if err := task.ValidateID(id); err != nil {
		return invalidParam("id", "%v", err)
	}
	sess, ok := s.sessions.get(id)
	if !ok {
		return apiError(fiber.StatusNotFound, CodeSessionNotFound, "session %s does not exist or has expired", id)
	}
	return c.JSON(fiber.Map{"session_id": sess.ID, "model_id": sess.ModelID, "turns": len(sess.Turns), "max_turns": sessionMaxTurns,
		"task_ids": sess.Turns, "created_at": sess.CreatedAt, "last_used": sess.LastUsed, "expires_at": sess.ExpiresAt,
		"ttl_ms": time.Until(sess.ExpiresAt).Milliseconds()})
}

func (s *Server) deleteSession(c *fiber.Ctx) error {
	id := c.Params("id")
	if err := task.ValidateID(id); err != nil {
		return invalidParam("id", "%v", err)
	}
	if !s.sessions.remove(id) {
		return apiError(fiber.StatusNotFound, CodeSessionNotFound, "session %s does not exist or has expired", id)
	}
	return c.SendStatus(fiber.StatusNoContent)
}
