// Package bearer is the one credential check of llorch's HTTP listeners (the
// REST API and the node link): a bearer token compared in constant time on
// its SHA-256 digest, the fingerprint logs show instead of a token, and the
// rule that a listener without a token binds loopback addresses only.
package bearer
