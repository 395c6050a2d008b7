// Package e2e runs llorch as real processes (apiserver, node workers) against
// a real Temporal dev server and checks what an operator would: nodes join,
// die, come back and leave, and the control plane notices within seconds.
package e2e
