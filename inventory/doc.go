// Package inventory collects what a node has to offer: its GPUs as NVML
// reports them, CPU cores, RAM, free disk for the model directory and the
// node's identity. Inventory is sent once when a node registers; Snapshot is
// the cheap subset repeated on every heartbeat.
//
// A node without an NVIDIA driver is not an error: the collector falls back
// to CPU-only and says why, so the same worker binary runs everywhere. The
// NVML handle is injectable, and Mock exposes go-nvml's simulated DGX
// servers, so the GPU path can be exercised on machines without GPUs.
package inventory
