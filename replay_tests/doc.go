// Package replay_tests replays workflow histories recorded from real runs
// (testdata/*.json) against today's workflow code. A change that breaks one
// is a change that would break running workflows: put it behind
// workflow.GetVersion. Record new histories with `just record-histories`.
package replay_tests
