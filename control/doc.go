// Package control is the one client of llorch's control plane: the calls
// the apiserver, the node agent and the CLI make on node, pool, staging, GC
// and task workflows. It starts, signals, updates and queries them by type
// name through the Temporal client and the contract packages (node, pool,
// model, task) alone, so a caller never links workflow or activity code,
// and it maps Temporal's answers to its own errors so callers never inspect
// gRPC errors.
package control
