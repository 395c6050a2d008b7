// Package lease is the supervisor lease between a node's worker and the
// built-in engines it starts: a file the worker touches while it supervises
// the engine (`llorch engine --supervisor-lease`), which the engine watches
// to exit once nobody has for too long. Both sides import it; it needs no
// libllama.
package lease
