package control

import (
	"context"

	"github.com/llorch/llorch/apikey"
)

// The actor travels in the context: the apiserver puts the caller there
// once, as it authenticates, and every call of this package reads it.
// Starts put it in the new workflow's memo; changes (drain, cancel, end...)
// carry it in their signal or update payload, and the workflow upserts its
// memo from it. Calls the system makes on its own (a node agent, a pool's
// staging) carry none.
type actorKey struct{}

// WithActor is ctx naming a as who makes the calls made with it.
func WithActor(ctx context.Context, a apikey.Actor) context.Context {
	return context.WithValue(ctx, actorKey{}, a)
}

// ActorFrom is the actor ctx names, nil when none.
func ActorFrom(ctx context.Context) *apikey.Actor {
	a, ok := ctx.Value(actorKey{}).(apikey.Actor)
	if !ok || a.KeyID == "" {
		return nil
	}
	return &a
}

// ActorMemo adds the context's actor to memo (a new map when memo is nil;
// memo unchanged without an actor): every start of a workflow for the API
// uses it, so the Temporal UI names who started it.
func ActorMemo(ctx context.Context, memo map[string]any) map[string]any {
	a := ActorFrom(ctx)
	if a == nil {
		return memo
	}
	if memo == nil {
		memo = map[string]any{}
	}
	memo[apikey.MemoActor] = *a
	return memo
}
