// Package workers says which workflows and activities run on the control
// queue, and holds the fx modules that run the control worker and the node
// agent (workers/agent) with its metrics endpoint.
package workers
