package apiserver

import (
	"errors"
	"testing"

	"github.com/llorch/llorch/task"
)

// requireInvalid: every refusal of a request body is a 400 INVALID_PARAMS
// naming a field.
func requireInvalid(t *testing.T, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("not an API error: %T %v", err, err)
	}
	if e.Status != 400 && e.Status != 413 || e.Code != CodeInvalidParams || e.Field == "" || e.Message == "" {
		t.Fatalf("bad refusal: %+v", e)
	}
}

// checkTask holds for every request that passes parsing.
func checkTask(t *testing.T, req task.Request) {
	t.Helper()
	p := req.Params
	switch {
	case task.ValidateID(req.TaskID) != nil:
		t.Fatalf("task id %q", req.TaskID)
	case (req.Prompt == "") == (len(req.Messages) == 0):
		t.Fatalf("prompt %q and %d messages", req.Prompt, len(req.Messages))
	case len(req.Prompt) > maxPromptBytes:
		t.Fatalf("prompt of %d bytes", len(req.Prompt))
	case req.Priority != task.Interactive && req.Priority != task.Batch:
		t.Fatalf("priority %q", req.Priority)
	case p.MaxTokens < 1 || p.Temperature < 0 || p.Temperature > 2 || p.TopP <= 0 || p.TopP > 1 || p.TopK < 0 || p.Seed < -1:
		t.Fatalf("params %+v", p)
	case req.Deadline < 0 || len(p.Stop) > 4:
		t.Fatalf("deadline %s, stop %q", req.Deadline, p.Stop)
	}
}

func FuzzTaskRequest(f *testing.F) {
	for _, s := range []string{
		`{"model_ref":"m","prompt":"hi","max_tokens":8,"priority":"batch","seed":3,"deadline_ms":500}`,
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"top_p":0.9,"stop":["\n"]}`,
		`{"model_ref":"m","prompt":"x","placement":{"mode":"pin","pin_pool_id":"p1"},"determinism":"strict"}`,
		`{"model_ref":"m","prompt":"x","placement":{"mode":"prefer","prefer_pools":["a"],"avoid_pools":["b"],"allow_fallback":false}}`,
		`{"model_ref":"../x","prompt":""}`, `{"prompt":1}`, `[]`, `{"max_tokens":-1}`, `{"task_id":"a/b"}`,
		`{"model_ref":"m","prompt":"x","workload":"completion","engine":"llamacpp","ctx":2048,"max_tokens":64}`,
		`{"model_ref":"m","prompt":"x","engine":"vllm","ctx":0,"kv_hint":"reuse","inputs":["a"]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var r taskRequest
		if err := decodeStrict(body, &r); err != nil {
			requireInvalid(t, err)
			return
		}
		in, err := r.input()
		if err != nil {
			requireInvalid(t, err)
			return
		}
		req, err := parseTask(in, "max_tokens")
		if err != nil {
			requireInvalid(t, err)
			return
		}
		checkTask(t, req)
	})
}

func FuzzOpenAIRequest(f *testing.F) {
	for _, s := range []string{
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}`,
		`{"model":"m","messages":[{"role":"system","content":[{"type":"text","text":"a"}]}],"stop":"x","n":1,"user":"u"}`,
		`{"model":"m","prompt":"once","max_completion_tokens":4,"temperature":0,"seed":7}`,
		`{"model":"m","messages":[{"role":"tool","content":{}}]}`, `{"model":"","n":2}`, `{"stop":[1]}`,
		`{"model":"m","prompt":"p","response_format":{"type":"json_object"},"tools":[{"type":"function"}],"logprobs":true}`,
		`{"model":"m","messages":[{"role":"developer","content":"x","name":"a","tool_calls":[]}],"frequency_penalty":0,"top_k":3}`,
	} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, body []byte, chat bool) {
		var r openAIRequest
		if err := decodeLooseBytes(body, &r); err != nil {
			requireInvalid(t, err)
			return
		}
		if err := checkOpenAIFields(body, chat); err != nil {
			requireInvalid(t, err)
			return
		}
		in, field, err := r.input(chat)
		if err != nil {
			requireInvalid(t, err)
			return
		}
		req, err := parseTask(in, field)
		if err != nil {
			requireInvalid(t, err)
			return
		}
		checkTask(t, req)
	})
}
