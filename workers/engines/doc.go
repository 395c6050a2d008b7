// Package engines is a node's table of engine processes: it spawns them
// (pinned to the engine CPUs, marked with their node, pool and epoch in
// their environment), adopts those an earlier worker left running, fences
// and stops them, renews their supervisor leases and keeps their logs and
// handoff files under <runtime>/engines. The engine activities drive it; the
// node agent's handoff watcher adopts and fences through it.
package engines
