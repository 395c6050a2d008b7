package workflows

import (
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/apikey"
)

// recordActor names in the workflow's memo who made its last change through
// the API (the Temporal UI shows it: who drained this pool). A payload
// without an actor (sent before audit, or by the system itself) changes
// nothing, so recorded histories replay; new ones mark the change.
func recordActor(ctx workflow.Context, a *apikey.Actor, change string) {
	if a == nil {
		return
	}
	// Changes of workflows started before "actor-memo" upsert nothing.
	if workflow.GetVersion(ctx, "actor-memo", workflow.DefaultVersion, 1) < 1 {
		return
	}
	if err := workflow.UpsertMemo(ctx, map[string]any{apikey.MemoActor: *a, apikey.MemoLastChange: change}); err != nil {
		workflow.GetLogger(ctx).Warn("memo of the actor not recorded", "actor", a.String(), "change", change, "err", err)
	}
}
