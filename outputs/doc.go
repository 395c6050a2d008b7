// Package outputs keeps task outputs too large for Temporal's payload
// limit in the model bucket, under outputs/<task_id>/: the node's Generate
// activity writes one object per generation and the task's history holds a
// task.OutputRef (key, size, SHA-256); the control plane reads it back
// (checking the checksum) and deletes it after the output retention.
//
// An object is a Temporal payload made by the cluster's data converter,
// serialized: with codec keys (LLORCH_CODEC_KEYS) it is encrypted under the
// current key like every payload in history, so the bucket holds no
// plaintext output either, and rotation is the codec's.
//
// Its own package, not modelstore's: the objects are the tasks', not the
// catalog's, and nodes may write this prefix alone.
package outputs
