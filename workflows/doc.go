// Package workflows holds llorch's deterministic workflow code: the node
// lifecycle (Node), model staging (Stage), garbage collection (GC), pools
// (Pool) and inference tasks (Task). Inputs, results and message names are
// in the contract packages (node, pool, model, task); side effects are
// activities (package activities and scheduler.TaskControl). No I/O, no
// goroutines, no wall clock here.
package workflows
