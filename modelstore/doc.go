// Package modelstore holds models: the S3 (MinIO) bucket and the catalog
// entries kept in it, GGUF metadata and VRAM estimates (gguf-parser-go), the
// tiny test-model writer, and a node's local catalog of verified files.
package modelstore
