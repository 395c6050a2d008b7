// Package protocol is llama-server's HTTP API as llorch speaks it: the
// request and response shapes of the endpoints the worker calls (/health,
// /props, /slots, /tokenize, /apply-template, streaming /completion) and a
// small client for them. The worker drives llama-server and the built-in
// engine host (package engine) alike through it; the host answers in these
// shapes where it can share them. It imports nothing of libllama, so the
// worker's activities do not either.
package protocol
