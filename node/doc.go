// Package node is the contract of the node registry that the apiserver, the
// control worker and the node agents share: workflow ids, task queues, signal,
// query and update names, search attributes and the types that cross them.
// It holds no workflow or I/O code so every side can import it.
package node
