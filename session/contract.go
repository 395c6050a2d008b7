package session

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/task"
)

// WorkflowType is the registered name of the session workflow.
const WorkflowType = "Session"

const workflowIDPrefix = "session:"

// WorkflowID is the id of a session's workflow.
func WorkflowID(sessionID string) string { return workflowIDPrefix + sessionID }

// IDFromWorkflowID reads the session id out of session:<id>, the inverse of
// WorkflowID.
func IDFromWorkflowID(workflowID string) (string, bool) {
	id, ok := strings.CutPrefix(workflowID, workflowIDPrefix)
	return id, ok && id != ""
}

// Limits of a session.
const (
	MaxTurns = 8
	// TTL is how long a session is kept after its last turn.
	TTL = 10 * time.Minute
)

// Workflow messages.
const (
	// UpdateTurn takes the next turn for a task (TurnRequest -> TurnResult).
	UpdateTurn = "turn"
	// UpdateRelease gives back the turn of a task that did not start
	// (ReleaseRequest).
	UpdateRelease = "release"
	// UpdateEnd ends the session (DELETE; EndRequest, none before audit).
	UpdateEnd = "end"
	// QueryInfo reads the session (Info).
	QueryInfo = "info"
)

// Error codes (application error types of the updates, and the API's).
const (
	ErrTurnLimit = "SESSION_TURN_LIMIT"
	ErrNotFound  = "SESSION_NOT_FOUND"
	// ErrEnded refuses a turn that reached a session as it closed; the
	// client starts a fresh one with the same id.
	ErrEnded = "SESSION_ENDED"
	// ErrInvalid refuses a malformed turn or release.
	ErrInvalid = "INVALID_SESSION_MESSAGE"
)

// Input starts a session's workflow.
type Input struct {
	SessionID string `json:"session_id"`
}

// TurnRequest asks for a task's turn. The first turn's model is the
// session's.
type TurnRequest struct {
	TaskID  string `json:"task_id"`
	ModelID string `json:"model_id"`
}

// Validate refuses a turn without a valid task id or a model.
func (r TurnRequest) Validate() error {
	if err := task.ValidateID(r.TaskID); err != nil {
		return err
	}
	if r.ModelID == "" {
		return errors.New("a turn needs the task's model id")
	}
	return nil
}

// TurnResult is the turn a task got (1..MaxTurns). New is false when the
// task already had it (a retried admission), so a failed start gives back
// only a turn it took.
type TurnResult struct {
	Turn int  `json:"turn"`
	New  bool `json:"new"`
}

// ReleaseRequest gives back a task's turn.
type ReleaseRequest struct {
	TaskID string `json:"task_id"`
}

// Validate refuses a release without a valid task id.
func (r ReleaseRequest) Validate() error { return task.ValidateID(r.TaskID) }

// Info is a session as a reader sees it (the query's answer and the
// workflow's result).
type Info struct {
	SessionID string    `json:"session_id"`
	ModelID   string    `json:"model_id"`
	TaskIDs   []string  `json:"task_ids"` // one per turn, in order
	CreatedAt time.Time `json:"created_at"`
	LastUsed  time.Time `json:"last_used"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Summary is one line for a person: turns used and expiry.
func (i Info) Summary() string {
	last := ""
	if n := len(i.TaskIDs); n > 0 {
		last = fmt.Sprintf(", last task %s", i.TaskIDs[n-1])
	}
	return fmt.Sprintf("session %s: %d of %d turns%s; expires %s", i.SessionID, len(i.TaskIDs), MaxTurns, last,
		i.ExpiresAt.UTC().Format(time.RFC3339))
}

// EndRequest is the argument of UpdateEnd: who ended the session, for the
// workflow's memo.
type EndRequest struct {
	Actor *apikey.Actor `json:"actor,omitempty"`
}
