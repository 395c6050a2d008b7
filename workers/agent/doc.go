// Package agent is a node's presence in the cluster: a worker on the node's
// own queue that registers the node when it starts (its liveness sessions
// are served there) and deregisters it on SIGTERM, fails the staging
// attempts a dead predecessor left, and watches engine handoffs, adopting
// or fencing the engines an earlier worker left running.
package agent
