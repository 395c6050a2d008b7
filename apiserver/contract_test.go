package apiserver

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/task"
)

// The original contract's fields: workload, engine, ctx and kv_hint are
// honoured (as placement constraints and hints); those not acted on yet are
// refused naming them, never dropped.
func TestTaskContractFields(t *testing.T) {
	ok := func(body string) taskInput {
		var r taskRequest
		require.NoError(t, decodeStrict([]byte(body), &r), body)
		in, err := r.input()
		require.NoError(t, err, body)
		return in
	}
	in := ok(`{"model_ref":"m","prompt":"x","workload":"completion","engine":"llama-server","ctx":4096,"max_tokens":100}`)
	require.Equal(t, "llama-server", in.placement.Engine)
	require.Equal(t, 4096, in.placement.MinCtx)
	in = ok(`{"model_ref":"m","prompt":"x","engine":"llamacpp","placement":{"mode":"prefer","prefer_pools":["a"]}}`)
	require.Equal(t, "llamacpp", in.placement.Engine)
	require.Equal(t, []string{"a"}, in.placement.PreferPools)
	ok(`{"model_ref":"m","prompt":"x","expected_tokens":null,"kv_hint":null}`)
	require.Equal(t, task.KVCold, ok(`{"model_ref":"m","prompt":"x","kv_hint":"cold"}`).placement.KVHint)
	require.Equal(t, task.KVReuse, ok(`{"model_ref":"m","prompt":"x","kv_hint":"reuse"}`).placement.KVHint)
	require.Equal(t, task.KVCold, ok(`{"model_ref":"m","prompt":"x","determinism":"strict"}`).placement.KVHint, "strict decodes the whole prompt")

	for body, field := range map[string]string{
		`{"model_ref":"m","prompt":"x","workload":"embedding"}`:                   "workload",
		`{"model_ref":"m","prompt":"x","workload":"chat"}`:                        "workload",
		`{"model_ref":"m","prompt":"x","engine":"vllm"}`:                          "engine",
		`{"model_ref":"m","prompt":"x","ctx":0}`:                                  "ctx",
		`{"model_ref":"m","prompt":"x","ctx":2000000}`:                            "ctx",
		`{"model_ref":"m","prompt":"x","ctx":64,"max_tokens":65}`:                 "max_tokens",
		`{"model_ref":"m","prompt":"x","placement":{"engine":"builtin"}}`:         "placement.engine",
		`{"model_ref":"m","prompt":"x","placement":{"min_ctx":9}}`:                "placement.min_ctx",
		`{"model_ref":"m","prompt":"x","expected_tokens":40}`:                     "expected_tokens",
		`{"model_ref":"m","prompt":"x","kv_hint":"warm"}`:                         "kv_hint",
		`{"model_ref":"m","prompt":"x","placement":{"kv_hint":"cold"}}`:           "placement.kv_hint",
		`{"model_ref":"m","prompt":"x","kv_hint":"reuse","determinism":"strict"}`: "kv_hint",
		`{"model_ref":"m","prompt":"x","sampler_profile_version":"v1"}`:           "sampler_profile_version",
		`{"model_ref":"m","prompt":"x","inputs":["a","b"]}`:                       "inputs",
	} {
		var r taskRequest
		require.NoError(t, decodeStrict([]byte(body), &r), body)
		_, err := r.input()
		var e *Error
		require.True(t, errors.As(err, &e), "%s: %v", body, err)
		require.Equal(t, field, e.Field, body)
	}
}
