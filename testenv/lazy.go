package testenv

// Start starts the services for a caller that cannot start them from
// TestMain: a fuzz target starts them on its first input, so only the
// processes that run inputs (the fuzzing engine's workers, or the one
// process of a plain `go test`) pay for them, never the coordinator.
// Stop them with Stop.
func Start() (*Env, error) { return start() }

// Stop stops the services Start started.
func (e *Env) Stop() { e.stop() }
