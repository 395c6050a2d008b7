// Package controlplane is the apiserver process: every client of the
// control plane, the scheduler, the REST API and the control worker, wired
// once. `llorch apiserver` builds it from its flags; the fuzz campaign and
// the API tests build the same thing against their own Temporal and S3,
// so what they exercise is production's wiring, not a copy of it.
package controlplane
