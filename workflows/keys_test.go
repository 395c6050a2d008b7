package workflows

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/apikey"
)

func keyReq(id string, scopes ...apikey.Scope) apikey.CreateRequest {
	return apikey.CreateRequest{ID: id, Name: "ci " + id, Scopes: scopes, Hash: strings.Repeat("ab", 32),
		CreatedBy: apikey.Actor{KeyID: apikey.BootstrapID, KeyName: "bootstrap"}}
}

func keysSnapshot(t *testing.T, env *testsuite.TestWorkflowEnvironment, since int64) apikey.Snapshot {
	v, err := env.QueryWorkflow(apikey.QueryKeys, since)
	require.NoError(t, err)
	var s apikey.Snapshot
	require.NoError(t, v.Get(&s))
	return s
}

// Creates and revokes: bad input refused by the validator (no history),
// a retried create and a second revoke answered unchanged, the version
// moving with each change only, a poll at the current version answered
// without the records; then a continue-as-new carries the records and the
// stream key.
func TestKeysRegistry(t *testing.T) {
	env := sessionEnv()
	const a, b = "k0000000000000001", "k0000000000000002"
	ok := func(r any, err error) { require.NoError(t, err) }
	refused := map[string]string{}
	refuse := func(name string, req any, update string) {
		sessionUpdate(env, time.Second, update, req, func(_ any, err error) {
			refused[name] = errType(err) + ": " + err.Error()
		})
	}
	sessionUpdate(env, 0, apikey.UpdateCreate, keyReq(a, apikey.Inference), ok)
	node := keyReq(b, apikey.Node)
	node.NodeID = "n1"
	sessionUpdate(env, 0, apikey.UpdateCreate, node, ok)
	for name, mut := range map[string]func(*apikey.CreateRequest){
		"unknown scope":  func(r *apikey.CreateRequest) { r.Scopes = []apikey.Scope{"root"} },
		"no scope":       func(r *apikey.CreateRequest) { r.Scopes = nil },
		"empty name":     func(r *apikey.CreateRequest) { r.Name = "" },
		"long name":      func(r *apikey.CreateRequest) { r.Name = strings.Repeat("x", apikey.MaxNameLen+1) },
		"node no id":     func(r *apikey.CreateRequest) { r.Scopes = []apikey.Scope{apikey.Node} },
		"id no node":     func(r *apikey.CreateRequest) { r.NodeID = "n1" },
		"expired":        func(r *apikey.CreateRequest) { r.ExpiresAt = time.Unix(1, 0) },
		"negative limit": func(r *apikey.CreateRequest) { r.Limits.ConcurrentTasks = -1 },
		"bad id":         func(r *apikey.CreateRequest) { r.ID = "k1" },
		"bad hash":       func(r *apikey.CreateRequest) { r.Hash = "secret" },
	} {
		req := keyReq("k00000000000000ff", apikey.Inference)
		mut(&req)
		refuse(name, req, apikey.UpdateCreate)
	}
	other := keyReq(a, apikey.Admin)
	other.Hash = strings.Repeat("cd", 32)
	refuse("same id other hash", other, apikey.UpdateCreate)
	refuse("revoke unknown", apikey.RevokeRequest{ID: "k00000000000000ee"}, apikey.UpdateRevoke)
	var retried apikey.Record
	sessionUpdate(env, 2*time.Second, apikey.UpdateCreate, keyReq(a, apikey.Inference), func(r any, err error) {
		require.NoError(t, err)
		retried = r.(apikey.Record)
	})
	var before, unchanged apikey.Snapshot
	env.RegisterDelayedCallback(func() {
		before = keysSnapshot(t, env, -1)
		unchanged = keysSnapshot(t, env, before.Version)
	}, 3*time.Second)
	var revoked []apikey.Record
	for i := range 2 {
		sessionUpdate(env, time.Duration(4+i)*time.Second, apikey.UpdateRevoke, apikey.RevokeRequest{ID: a, By: apikey.Actor{KeyID: "kx", KeyName: "ops"}},
			func(r any, err error) { require.NoError(t, err); revoked = append(revoked, r.(apikey.Record)) })
	}
	var after apikey.Snapshot
	env.RegisterDelayedCallback(func() { after = keysSnapshot(t, env, before.Version) }, 6*time.Second)
	// The history passes its bound: the registry continues as new.
	sessionUpdate(env, 7*time.Second, apikey.UpdateCreate, keyReq("k0000000000000003", apikey.Inference), ok)
	env.RegisterDelayedCallback(func() { env.SetCurrentHistoryLength(41) }, 8*time.Second)
	env.ExecuteWorkflow(Keys, apikey.RegistryInput{StreamKey: []byte("0123456789abcdef0123456789abcdef"), ContinueAsNewAfterEvents: 40})

	require.Len(t, refused, 12, "%v", refused)
	for name, got := range refused {
		want := apikey.ErrInvalid
		switch name {
		case "same id other hash":
			want = apikey.ErrExists
		case "revoke unknown":
			want = apikey.ErrNotFound
		}
		require.True(t, strings.HasPrefix(got, want+": "), "%s: %s", name, got)
	}
	require.Contains(t, refused["node no id"], "node_id")
	require.Equal(t, a, retried.ID)
	require.Len(t, before.Keys, 2)
	require.Equal(t, int64(2), before.Version, "a retried create changes nothing")
	require.Equal(t, "n1", before.Keys[1].NodeID)
	require.Nil(t, unchanged.Keys, "an unchanged version comes without the records")
	require.Equal(t, []byte("0123456789abcdef0123456789abcdef"), unchanged.StreamKey)
	require.Len(t, revoked, 2)
	require.False(t, revoked[0].RevokedAt.IsZero())
	require.Equal(t, revoked[0], revoked[1], "a second revoke is the same answer")
	require.Equal(t, "ops", revoked[0].RevokedBy.KeyName)
	require.Equal(t, int64(3), after.Version)
	require.False(t, after.Keys[0].Live(env.Now()))

	require.True(t, env.IsWorkflowCompleted())
	var can *workflow.ContinueAsNewError
	require.True(t, errors.As(env.GetWorkflowError(), &can), "%v", env.GetWorkflowError())
	var next apikey.RegistryInput
	require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(can.Input, &next))
	require.Equal(t, []byte("0123456789abcdef0123456789abcdef"), next.StreamKey)
	require.Len(t, next.Records, 3)
	require.Equal(t, a, next.Records[0].ID)
	require.False(t, next.Records[0].RevokedAt.IsZero(), "a revocation survives the continue-as-new")
	require.Greater(t, next.Version, after.Version, "a poller of the old run sees a change")
}

func TestPruneKeepsRecentRecords(t *testing.T) {
	now := time.Now()
	old, recent := now.Add(-apikey.PruneAfter-time.Hour), now.Add(-time.Hour)
	got := prune([]apikey.Record{{ID: "a", RevokedAt: old}, {ID: "b", RevokedAt: recent}, {ID: "c", ExpiresAt: old}, {ID: "d"}}, now)
	require.Len(t, got, 2)
	require.Equal(t, "b", got[0].ID)
	require.Equal(t, "d", got[1].ID)
}
