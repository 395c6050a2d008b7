// Package session is the contract of sessions: the session workflow's type
// name, its id (session:<id>) and inverse, its update and query names and
// payloads, the limits and the error codes the workflow, its client and the
// API share. A session is metadata only (which tasks made its turns); it
// lives in its workflow, so every apiserver replica reads and counts the
// same one. No I/O here.
package session
