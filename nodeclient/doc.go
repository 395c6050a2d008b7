// Package nodeclient is the client side of the node registry: the calls the
// apiserver and the node agent make on node workflows (register, heartbeat,
// drain, deregister, read). It maps Temporal's answers to the registry's own
// errors so callers never inspect gRPC errors.
package nodeclient
