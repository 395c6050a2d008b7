// Package fuzz holds the fuzz campaign against a running apiserver
// (FuzzAPI): every route of its route table, with hostile path parameters,
// query values, headers, framing and bodies, sent over TCP to a real
// apiserver (in the test process, built by controlplane as `llorch
// apiserver` builds it, so the engine's coverage reaches its handlers and
// what is fuzzed is production's wiring) with a real Temporal, S3
// and a node worker (`llorch worker`) serving a
// pool on the built-in engine. Its corpus is testdata/fuzz/FuzzAPI;
// `just fuzz` runs the campaign for a bounded time (docs/security.md,
// "Fuzzing").
package fuzz
