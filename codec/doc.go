// Package codec encrypts Temporal payloads: a converter.PayloadCodec with
// AES-256-GCM under keys named by id, so keys rotate (the first key
// encrypts, every key decrypts), and the HTTP side of Temporal's
// codec-server protocol, so the Temporal UI and CLI decode histories for
// an operator who holds a bearer token.
//
// Invariants: a payload this codec encrypted carries the metadata
// `encoding: binary/encrypted` and `encryption-key-id: <id>` (the
// conventions of Temporal's samples-go `encryption` sample) and nothing
// of its plaintext, its metadata included; decoding passes every other
// payload through unchanged, so histories recorded before the codec still
// replay; a payload under a key id the codec does not hold fails, naming
// that id. Keys come from the environment or a file, never a flag.
package codec
