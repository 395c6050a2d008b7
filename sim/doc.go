// Package sim runs simulated nodes in one process: each is a real node agent
// (workers/agent) that registers and proves liveness through the same
// workflow, activity and heartbeats as `llorch worker`, over one shared
// Temporal connection, with GPUs from go-nvml's mock servers (or none) and
// no engines, staging or GC. It exists to measure what the control plane
// costs per node at counts no test lab has (`llorch sim nodes`, and
// bench.BenchmarkControlPlaneIdle).
package sim
