// Package devcluster runs the whole of llorch on one machine as one
// foreground process tree: `llorch dev`.
//
// It starts four children and supervises them:
//
//   - temporal: the Temporal CLI dev server (a SQLite file in the state dir,
//     so workflows and node history survive a restart);
//   - s3: versitygw serving a directory of the state dir over S3, the
//     stand-in for MinIO (whose server is AGPL and is not shipped);
//   - apiserver: this same llorch binary, `llorch apiserver`;
//   - worker: this same llorch binary, `llorch worker` for one local node.
//
// The children are separate processes, not goroutines, on purpose: the dev
// cluster then runs the exact code and flags a production deployment runs,
// the Temporal server keeps its own SDK pins out of our module, and a second
// node is just `llorch worker --node-id node-2` in another terminal, which
// finds the cluster through the state file dev.env (see config.Apply).
//
// Process hygiene is the core of this package. Each child gets its own
// process group, so a Ctrl-C typed in the terminal reaches only `llorch dev`,
// which can then stop the children in dependency order (the worker first,
// so it deregisters its node while Temporal and the apiserver still answer).
// Each child also gets PR_SET_PDEATHSIG=SIGKILL, so none outlives a `llorch
// dev` that is itself killed without a chance to clean up.
package devcluster
