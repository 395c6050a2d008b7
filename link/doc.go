// Package link is the node link (docs/node-link.md): the authenticated HTTP
// endpoint each node worker serves at its advertise address, from which any
// apiserver replica follows the node's live state without polling Temporal.
//
// Source holds the state and its version; the node agent feeds it. Server
// serves it at node.LinkStatePath, a plain read or a long-poll that answers
// once the version differs from the caller's. Client reads it. The same
// server streams each task's events from the node's tokenstream.Hub
// (node.LinkTaskEventsPath) and ends a task's stream on cancel
// (node.LinkTaskCancelPath).
//
// Invariants:
//   - the version moves only when something a placement reads changes
//     (Source.Set), so a long-poll answers at most once per change, and at
//     its wait bound;
//   - every request is bounded: timeouts on the connection, at most
//     node.LinkMaxWait per long-poll, at most MaxWaiters long-polls at once
//     (beyond: 503 with Retry-After), at most MaxStreams task event
//     subscriptions, each write of an event stream bounded on its own;
//   - a long-poll holds no goroutine of its own: a caller that goes away or
//     a server that shuts down ends it at once.
package link
