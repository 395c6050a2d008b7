// Package apiclient is a Go client of the llorch REST API, the one `llorch
// models` uses. It speaks HTTP and JSON only: it starts no workflow and
// imports no Temporal, workflow or activity code. An answer other than 2xx
// is an *Error carrying the API's error envelope; a request that got no
// answer is an *UnreachableError.
package apiclient
