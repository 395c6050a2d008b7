// Package activities holds every side effect llorch's workflows ask for, as
// methods on structs that carry their dependencies (NVML, Temporal client,
// metrics). Workflows reference them by method expression, so tests mock
// exactly those methods.
package activities
