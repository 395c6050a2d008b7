// Package workflows holds llorch's deterministic workflow code: node
// lifecycle now, model staging, pools, inference and GC as they come. No I/O,
// no goroutines, no wall clock here; side effects live in package activities.
package workflows
