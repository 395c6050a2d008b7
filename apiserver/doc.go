// Package apiserver is llorch's REST API (fiber): bearer auth, the error
// envelope, correlation ids, Prometheus metrics and the /v2 routes. It starts,
// queries and updates workflows; it never touches a node's disk.
package apiserver
