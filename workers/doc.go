// Package workers says which workflows and activities run on which task
// queue, and runs the node agent: a worker on the node's own queue that
// registers the node when it starts and deregisters it on SIGTERM.
package workers
