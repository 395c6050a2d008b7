// Package engine is llorch's built-in inference engine host: a minimal server
// over libllama (loaded at run time through yzma, no cgo) that speaks the part
// of llama-server's HTTP API llorch uses, in llama-server's shapes.
//
// The worker drives every engine as a process speaking one protocol (DESIGN
// decision 7): llama-server in production, this host on CPU nodes, in dev and
// in CI, where no llama-server binary is installed. Anything the worker relies
// on must therefore behave like llama-server here: the listener is up before
// the model loads and /health answers 503 until it has; errors are
// {"error":{code,message,type}}; /completion streams SSE without [DONE] while
// /v1/chat/completions ends with data: [DONE]; a client disconnect cancels the
// generation. The shapes the worker reads, and its client, are in
// engine/protocol; the supervisor lease an engine watches is engine/lease.
//
// Each of the --parallel slots owns its own llama context: slots never share a
// KV cache, so one request cannot disturb another's output, and a request that
// finds every slot busy waits for one, as llama-server queues it.
package engine
