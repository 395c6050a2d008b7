// Package pool is the contract of engine pools: workflow ids, states, the
// pool spec, the handoff record a node writes when an engine is ready, the
// health a reader sees, and the error types. No I/O here.
package pool
