package control

import "errors"

// Errors of control calls, which callers map to API codes.
var (
	ErrNodeNotFound = errors.New("node not found")
	ErrNodeLeft     = errors.New("node has left")
	ErrAgentManaged = errors.New("node is managed by its llorch worker")

	ErrPoolNotFound = errors.New("pool not found")
	ErrPoolExists   = errors.New("pool exists")
	ErrPoolEnded    = errors.New("pool has ended")
	// ErrPoolBusy is a reload refused because the pool drains or already
	// reloads; the error's text says which.
	ErrPoolBusy = errors.New("pool is busy")

	ErrTaskNotFound = errors.New("task not found")
	ErrTaskExists   = errors.New("task exists")
)

// Errors of session calls.
var (
	ErrSessionNotFound = errors.New("session not found")
	// ErrSessionFull is a turn refused because the session has had all its
	// turns.
	ErrSessionFull = errors.New("session has had all its turns")
)

// ErrQuotaNotFound: a key has no quota workflow (never metered).
var ErrQuotaNotFound = errors.New("quota not found")
