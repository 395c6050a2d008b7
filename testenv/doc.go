// Package testenv starts the real services llorch's tests talk to: a Temporal
// dev server (the pinned temporal CLI) and a versitygw S3 server, once per
// test package on free loopback ports, and builds the llorch binary for tests
// that run real processes. Tests wait on conditions, never on sleeps.
package testenv
