// Package apikey is the contract of API keys: their scopes, limits, the
// principal a request authenticates as, and the actor that audit events and
// workflow memos name. It imports nothing of llorch, so every layer (the
// apiserver, control, the workflows) can carry it.
package apikey
