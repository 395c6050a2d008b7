// Package model is the contract of the model catalog and of staging: catalog
// entries, id and key rules, workflow ids of staging and GC, the error types
// workflows and the API map to codes, and what a node reports it holds. No
// I/O here, so the apiserver, the workers and the workflows all import it.
package model
