package engine_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/engine"
	"github.com/llorch/llorch/grammar"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/testenv"
)

var (
	modelOnce sync.Once
	modelPath string
	modelErr  error
)

// tinyModel writes one tiny GGUF for the whole package.
func tinyModel(t *testing.T) string {
	t.Helper()
	modelOnce.Do(func() {
		dir, err := os.MkdirTemp("", "engine-test-")
		if err != nil {
			modelErr = err
			return
		}
		modelPath = filepath.Join(dir, "tiny.gguf")
		modelErr = modelstore.WriteTinyFile(modelPath, modelstore.TinyOptions{})
	})
	require.NoError(t, modelErr)
	return modelPath
}

func startEngine(t *testing.T, o engine.Options) *engine.Server {
	t.Helper()
	o.LibDir = testenv.LlamaLib(t)
	if o.ModelPath == "" {
		o.ModelPath = tinyModel(t)
	}
	if o.Threads == 0 {
		o.Threads = 1 // one thread is fastest for the tiny model on shared cores
	}
	s, err := engine.Start(o)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, s.Close()) })
	return s
}

func loadedEngine(t *testing.T, o engine.Options) *engine.Server {
	s := startEngine(t, o)
	require.NoError(t, s.Load())
	return s
}

var client = &http.Client{Timeout: 60 * time.Second}

func get(t *testing.T, url string) (int, []byte) {
	t.Helper()
	resp, err := client.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, b
}

func post(t *testing.T, url, body string) (int, []byte) {
	t.Helper()
	resp, err := client.Post(url, "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, b
}

type completion struct {
	Content         string            `json:"content"`
	Stop            bool              `json:"stop"`
	StopType        string            `json:"stop_type"`
	StoppingWord    string            `json:"stopping_word"`
	TokensPredicted int               `json:"tokens_predicted"`
	TokensEvaluated int               `json:"tokens_evaluated"`
	TokensCached    int               `json:"tokens_cached"`
	IDSlot          int               `json:"id_slot"`
	Error           *apiErr           `json:"error"`
	Tokens          []int32           `json:"tokens"`
	Probs           []json.RawMessage `json:"completion_probabilities"`
	Timings         struct {
		CacheN             int     `json:"cache_n"`
		PromptN            int     `json:"prompt_n"`
		PromptMs           float64 `json:"prompt_ms"`
		PredictedMs        float64 `json:"predicted_ms"`
		PredictedPerSecond float64 `json:"predicted_per_second"`
	} `json:"timings"`
}

type apiErr struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Type    string `json:"type"`
}

func complete(t *testing.T, s *engine.Server, body string) completion {
	t.Helper()
	code, b := post(t, s.URL()+"/completion", body)
	require.Equal(t, http.StatusOK, code, string(b))
	var c completion
	require.NoError(t, json.Unmarshal(b, &c), string(b))
	return c
}

// stream reads a /completion SSE stream: the partial events and the final one.
func stream(t *testing.T, s *engine.Server, body string) ([]completion, completion) {
	t.Helper()
	resp, err := client.Post(s.URL()+"/completion", "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	var parts []completion
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		require.True(t, strings.HasPrefix(line, "data: "), line)
		require.NotEqual(t, "data: [DONE]", line, "/completion sends no [DONE]")
		var c completion
		require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &c), line)
		require.Nil(t, c.Error, line)
		if c.Stop {
			require.False(t, sc.Scan() && sc.Text() != "", "nothing after the final event")
			return parts, c
		}
		parts = append(parts, c)
	}
	require.NoError(t, sc.Err())
	t.Fatal("stream ended without a stop event")
	return nil, completion{}
}

func TestHealthIsUnavailableUntilLoaded(t *testing.T) {
	s := startEngine(t, engine.Options{})
	code, b := get(t, s.URL()+"/health")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.JSONEq(t, `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`, string(b))
	code, _ = post(t, s.URL()+"/completion", `{"prompt":"x"}`)
	assert.Equal(t, http.StatusServiceUnavailable, code, "every endpoint waits for the model")

	require.NoError(t, s.Load())
	code, b = get(t, s.URL()+"/health")
	assert.Equal(t, http.StatusOK, code)
	assert.JSONEq(t, `{"status":"ok"}`, string(b))
}

const greedy16 = `{"prompt":"Hello there","n_predict":16,"temperature":0}`

func TestCompletionGreedyIsDeterministic(t *testing.T) {
	s := loadedEngine(t, engine.Options{})
	a := complete(t, s, greedy16)
	assert.True(t, a.Stop)
	assert.Equal(t, "limit", a.StopType)
	assert.Equal(t, 16, a.TokensPredicted)
	assert.Positive(t, a.TokensEvaluated)
	assert.NotEmpty(t, a.Content)
	assert.True(t, utf8.ValidString(a.Content))
	assert.Positive(t, a.Timings.PredictedPerSecond)
	t.Logf("tiny model, 1 thread: %.0f tokens/s (%d tokens in %.2f ms)", a.Timings.PredictedPerSecond, a.TokensPredicted, a.Timings.PredictedMs)

	b := complete(t, s, greedy16)
	assert.Equal(t, a.Content, b.Content, "temperature 0 must repeat itself")

	// Seeded sampling repeats itself too.
	seeded := `{"prompt":"Hello there","n_predict":16,"temperature":0.9,"top_k":40,"top_p":0.9,"seed":7}`
	assert.Equal(t, complete(t, s, seeded).Content, complete(t, s, seeded).Content)
}

func TestCompletionStreamMatchesNonStream(t *testing.T) {
	s := loadedEngine(t, engine.Options{})
	want := complete(t, s, greedy16)
	parts, final := stream(t, s, `{"prompt":"Hello there","n_predict":16,"temperature":0,"stream":true}`)
	require.NotEmpty(t, parts)
	var got strings.Builder
	for _, p := range parts {
		assert.False(t, p.Stop)
		got.WriteString(p.Content)
	}
	got.WriteString(final.Content)
	assert.Equal(t, want.Content, got.String())
	assert.Equal(t, "limit", final.StopType)
	assert.Equal(t, 16, final.TokensPredicted)
	assert.Equal(t, want.TokensEvaluated, final.TokensEvaluated)
	assert.Positive(t, final.Timings.PredictedMs)
}

func TestCompletionStopWord(t *testing.T) {
	s := loadedEngine(t, engine.Options{})
	full := complete(t, s, `{"prompt":"Hello there","n_predict":32,"temperature":0}`)
	runes := []rune(full.Content)
	require.Greater(t, len(runes), 6, full.Content)
	// A word from the middle of the greedy output must cut it right there.
	word := string(runes[4:6])
	cut := full.Content[:strings.Index(full.Content, word)]

	body, _ := json.Marshal(map[string]any{"prompt": "Hello there", "n_predict": 32, "temperature": 0, "stop": []string{word}})
	c := complete(t, s, string(body))
	assert.Equal(t, "word", c.StopType)
	assert.Equal(t, word, c.StoppingWord)
	assert.Equal(t, cut, c.Content)
	assert.Less(t, c.TokensPredicted, 32)

	body, _ = json.Marshal(map[string]any{"prompt": "Hello there", "n_predict": 32, "temperature": 0, "stop": []string{word}, "stream": true})
	parts, final := stream(t, s, string(body))
	var got strings.Builder
	for _, p := range parts {
		got.WriteString(p.Content)
	}
	got.WriteString(final.Content)
	assert.Equal(t, cut, got.String(), "no part of the stop word is streamed")
	assert.Equal(t, "word", final.StopType)
}

func TestPropsSlotsMetrics(t *testing.T) {
	s := loadedEngine(t, engine.Options{Parallel: 2, CtxSize: 256})
	code, b := get(t, s.URL()+"/props")
	require.Equal(t, http.StatusOK, code)
	var props struct {
		TotalSlots int    `json:"total_slots"`
		BuildInfo  string `json:"build_info"`
		ModelPath  string `json:"model_path"`
		Defaults   struct {
			NCtx int `json:"n_ctx"`
		} `json:"default_generation_settings"`
	}
	require.NoError(t, json.Unmarshal(b, &props))
	assert.Equal(t, 2, props.TotalSlots)
	assert.NotEmpty(t, props.BuildInfo)
	assert.Equal(t, tinyModel(t), props.ModelPath)
	// 256 split over 2 slots; llama.cpp may round each context up (to 256).
	assert.GreaterOrEqual(t, props.Defaults.NCtx, 128)

	code, b = get(t, s.URL()+"/slots")
	require.Equal(t, http.StatusOK, code)
	var slots []struct {
		ID           int  `json:"id"`
		IsProcessing bool `json:"is_processing"`
		NCtx         int  `json:"n_ctx"`
	}
	require.NoError(t, json.Unmarshal(b, &slots))
	require.Len(t, slots, 2)
	for i, sl := range slots {
		assert.Equal(t, i, sl.ID)
		assert.False(t, sl.IsProcessing)
		assert.Equal(t, props.Defaults.NCtx, sl.NCtx)
	}

	c := complete(t, s, greedy16)
	code, b = get(t, s.URL()+"/metrics")
	require.Equal(t, http.StatusOK, code)
	m := string(b)
	assert.Contains(t, m, "llamacpp:tokens_predicted_total 16\n")
	assert.Contains(t, m, "llamacpp:prompt_tokens_total "+itoa(c.TokensEvaluated)+"\n")
	assert.Contains(t, m, "llamacpp:requests_processing 0\n")
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func TestParallelRequestsAgree(t *testing.T) {
	s := loadedEngine(t, engine.Options{Parallel: 2, CtxSize: 256})
	want := complete(t, s, greedy16).Content
	var wg sync.WaitGroup
	got := make([]string, 5) // more requests than slots: the rest wait
	for i := range got {
		wg.Go(func() {
			resp, err := client.Post(s.URL()+"/completion", "application/json", strings.NewReader(greedy16))
			if err != nil {
				return
			}
			defer resp.Body.Close()
			var c completion
			_ = json.NewDecoder(resp.Body).Decode(&c)
			got[i] = c.Content
		})
	}
	wg.Wait()
	for _, g := range got {
		assert.Equal(t, want, g)
	}
}

func TestErrors(t *testing.T) {
	s := loadedEngine(t, engine.Options{})
	for _, tc := range []struct {
		body string
		code int
		typ  string
	}{
		{`{"prompt": "x",`, 500, "server_error"},
		{`{"n_predict": 4}`, 400, "invalid_request_error"},
		{`{"prompt": 5}`, 400, "invalid_request_error"},
		{`{"prompt": "x", "top_p": 3}`, 400, "invalid_request_error"},
		{`{"prompt": "x", "n_predict": -5}`, 400, "invalid_request_error"},
		{`{"prompt": "` + strings.Repeat("word ", 400) + `"}`, 400, "invalid_request_error"},
	} {
		code, b := post(t, s.URL()+"/completion", tc.body)
		assert.Equal(t, tc.code, code, string(b))
		var e struct{ Error apiErr }
		require.NoError(t, json.Unmarshal(b, &e), string(b))
		assert.Equal(t, tc.code, e.Error.Code)
		assert.Equal(t, tc.typ, e.Error.Type)
		assert.NotEmpty(t, e.Error.Message)
	}
	code, _ := get(t, s.URL()+"/nope")
	assert.Equal(t, http.StatusNotFound, code)
}

func TestCorruptModelFailsFast(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.gguf")
	require.NoError(t, os.WriteFile(bad, bytes.Repeat([]byte("x"), 4096), 0o644))
	truncated := filepath.Join(dir, "truncated.gguf")
	good, err := os.ReadFile(tinyModel(t))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(truncated, good[:len(good)/2], 0o644))

	for _, path := range []string{bad, truncated, filepath.Join(dir, "missing.gguf")} {
		s := startEngine(t, engine.Options{ModelPath: path})
		t0 := time.Now()
		err := s.Load()
		require.Error(t, err, path)
		assert.Contains(t, err.Error(), path)
		assert.Less(t, time.Since(t0), 5*time.Second)
		code, _ := get(t, s.URL()+"/health")
		assert.Equal(t, http.StatusServiceUnavailable, code)
	}
}

func TestPortTaken(t *testing.T) {
	s := startEngine(t, engine.Options{})
	_, port, _ := strings.Cut(s.Addr(), ":")
	_, err := engine.Start(engine.Options{ModelPath: tinyModel(t), Port: atoi(t, port), LibDir: testenv.LlamaLib(t)})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cannot listen")
}

func atoi(t *testing.T, s string) int {
	var n int
	require.NoError(t, json.Unmarshal([]byte(s), &n))
	return n
}

func TestChatCompletions(t *testing.T) {
	s := loadedEngine(t, engine.Options{Alias: "tiny"})
	code, b := post(t, s.URL()+"/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0}`)
	require.Equal(t, http.StatusOK, code, string(b))
	var resp struct {
		Model   string
		Choices []struct {
			FinishReason string `json:"finish_reason"`
			Message      struct{ Role, Content string }
		}
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		}
	}
	require.NoError(t, json.Unmarshal(b, &resp))
	require.Len(t, resp.Choices, 1)
	assert.Equal(t, "tiny", resp.Model)
	assert.Equal(t, "length", resp.Choices[0].FinishReason)
	assert.Equal(t, "assistant", resp.Choices[0].Message.Role)
	assert.Equal(t, 8, resp.Usage.CompletionTokens)

	r, err := client.Post(s.URL()+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0,"stream":true}`))
	require.NoError(t, err)
	defer r.Body.Close()
	all, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(all)), "\n\n")
	require.Equal(t, "data: [DONE]", lines[len(lines)-1])
	var text strings.Builder
	for _, l := range lines[:len(lines)-1] {
		var c struct {
			Choices []struct {
				Delta        struct{ Content *string }
				FinishReason *string `json:"finish_reason"`
			}
		}
		require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(l, "data: ")), &c), l)
		if len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil {
			text.WriteString(*c.Choices[0].Delta.Content)
		}
	}
	assert.Equal(t, resp.Choices[0].Message.Content, text.String())
}

func TestClientDisconnectCancels(t *testing.T) {
	// A context far beyond what a test waits for: only cancellation ends it early.
	const nCtx = 32768
	s := loadedEngine(t, engine.Options{CtxSize: nCtx})
	resp, err := client.Post(s.URL()+"/completion", "application/json",
		strings.NewReader(`{"prompt":"a","n_predict":-1,"temperature":0,"stream":true}`))
	require.NoError(t, err)
	_, err = bufio.NewReader(resp.Body).ReadString('\n') // generation is running
	require.NoError(t, err)
	resp.Body.Close()

	deadline := time.Now().Add(30 * time.Second)
	for {
		_, b := get(t, s.URL()+"/slots")
		if !strings.Contains(string(b), `"is_processing":true`) {
			break
		}
		require.True(t, time.Now().Before(deadline), "the slot still generates after the client went away")
		time.Sleep(10 * time.Millisecond)
	}
	_, m := get(t, s.URL()+"/metrics")
	var predicted int
	for _, line := range strings.Split(string(m), "\n") {
		if v, ok := strings.CutPrefix(line, "llamacpp:tokens_predicted_total "); ok {
			predicted = atoi(t, v)
		}
	}
	assert.Less(t, predicted, nCtx/2, "generation stopped early, not at the context limit")
	c := complete(t, s, `{"prompt":"b","n_predict":4,"temperature":0}`)
	assert.Equal(t, 4, c.TokensPredicted)
}

// llamaServer starts LLORCH_LLAMA_SERVER on model with one slot and
// returns its URL; it skips the test, visibly, when the variable is unset.
func llamaServer(t *testing.T, model string, extra ...string) string {
	t.Helper()
	bin := os.Getenv("LLORCH_LLAMA_SERVER")
	if bin == "" {
		t.Skip("SKIP (visible on purpose): LLORCH_LLAMA_SERVER is not set, so the built-in engine is not compared with llama-server")
	}
	port := freePort(t)
	cmd := exec.Command(bin, "-m", model, "--host", "127.0.0.1", "--port", fmt.Sprint(port), "-c", "256", "-np", "1", "-t", "1", "--no-webui")
	cmd.Args = append(cmd.Args, extra...)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	theirs := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(60 * time.Second)
	for {
		res, err := client.Get(theirs + "/health")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				break
			}
		}
		require.True(t, time.Now().Before(deadline), "llama-server not healthy within 60s")
		time.Sleep(50 * time.Millisecond)
	}
	return theirs
}

// With LLORCH_LLAMA_SERVER naming a llama-server binary, greedy decoding of
// the built-in engine must give llama-server's tokens on the same model,
// and what the worker reads of a completion must mean the same on both: a
// text prompt's length (tokens_evaluated, as /tokenize counts it), the
// output under a grammar, and the tokens' log probabilities (n_probs).
func TestGreedyMatchesLlamaServer(t *testing.T) {
	model := tinyModel(t)
	theirs := llamaServer(t, model)
	ours := loadedEngine(t, engine.Options{})
	complete := func(base, body string) completion {
		res, err := client.Post(base+"/completion", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		defer res.Body.Close()
		raw, _ := io.ReadAll(res.Body)
		require.Equal(t, 200, res.StatusCode, string(raw))
		var out completion
		require.NoError(t, json.Unmarshal(raw, &out), string(raw))
		return out
	}
	body := `{"prompt":"the","n_predict":24,"temperature":0,"seed":1}`
	a, b := complete(theirs, body), complete(ours.URL(), body)
	require.Equal(t, a.Content, b.Content)
	require.Equal(t, a.TokensEvaluated, b.TokensEvaluated, "a text prompt's length")
	code, raw := post(t, theirs+"/tokenize", `{"content":"the","add_special":true}`)
	require.Equal(t, 200, code)
	var tk struct{ Tokens []int32 }
	require.NoError(t, json.Unmarshal(raw, &tk))
	require.Equal(t, len(tk.Tokens), a.TokensEvaluated, "tokens_evaluated counts the prompt as /tokenize does")

	g, err := grammar.FromSchema([]byte(`{"type":"object","properties":{"ok":{"type":"boolean"},"c":{"enum":["red","blue"]}},"required":["ok","c"]}`))
	require.NoError(t, err)
	q, _ := json.Marshal(g)
	body = `{"prompt":"the","n_predict":64,"temperature":0,"grammar":` + string(q) + `}`
	a, b = complete(theirs, body), complete(ours.URL(), body)
	require.Equal(t, a.Content, b.Content, "greedy under the same grammar")
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(a.Content), &v), a.Content)

	type probs struct {
		Probs []struct {
			ID      int32   `json:"id"`
			Logprob float64 `json:"logprob"`
			Top     []struct {
				ID      int32   `json:"id"`
				Logprob float64 `json:"logprob"`
			} `json:"top_logprobs"`
		} `json:"completion_probabilities"`
	}
	body = `{"prompt":"the","n_predict":6,"temperature":0,"n_probs":3}`
	var pa, pb probs
	for base, p := range map[string]*probs{theirs: &pa, ours.URL(): &pb} {
		res, err := client.Post(base+"/completion", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		require.NoError(t, json.NewDecoder(res.Body).Decode(p))
		res.Body.Close()
	}
	require.Len(t, pb.Probs, len(pa.Probs))
	for i := range pa.Probs {
		require.Equal(t, pa.Probs[i].ID, pb.Probs[i].ID, "token %d", i)
		require.InDelta(t, pa.Probs[i].Logprob, pb.Probs[i].Logprob, 1e-3, "token %d", i)
		require.Len(t, pb.Probs[i].Top, len(pa.Probs[i].Top))
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// A generation resumed from its prompt's tokens plus the tokens it had
// produced continues exactly as the uninterrupted one (what a task moved to
// another node relies on); return_tokens reports the sampled ids.
func TestTokenPromptResumesExactly(t *testing.T) {
	s := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 512, Parallel: 1, Threads: 1})
	code, b := post(t, s.URL()+"/tokenize", `{"content":"Once upon a time","add_special":true}`)
	require.Equal(t, 200, code, string(b))
	var tok struct{ Tokens []int32 }
	require.NoError(t, json.Unmarshal(b, &tok))
	require.NotEmpty(t, tok.Tokens)

	parts, last := stream(t, s, `{"prompt":"Once upon a time","n_predict":40,"temperature":0,"return_tokens":true,"stream":true}`)
	var all []int32
	var text string
	for _, p := range append(parts, last) {
		all = append(all, p.Tokens...)
		text += p.Content
	}
	require.Len(t, all, last.TokensPredicted, "every sampled token is reported once")
	full := complete(t, s, `{"prompt":"Once upon a time","n_predict":40,"temperature":0}`)
	require.Equal(t, full.Content, text)

	for _, k := range []int{1, 17, 39} {
		prompt, _ := json.Marshal(append(append([]int32{}, tok.Tokens...), all[:k]...))
		rest := complete(t, s, `{"prompt":`+string(prompt)+`,"n_predict":`+itoa(40-k)+`,"temperature":0,"return_tokens":true,"resume_at":`+itoa(len(tok.Tokens))+`}`)
		require.Equal(t, all[k:], rest.Tokens, "resumed after %d tokens", k)
	}

	code, b = post(t, s.URL()+"/completion", `{"prompt":[1,99999999],"n_predict":1}`)
	require.Equal(t, 400, code, string(b))
	require.Contains(t, string(b), "outside the vocabulary")
}

// logit_bias false bans a token: greedy decoding then picks another.
func TestLogitBiasBansToken(t *testing.T) {
	s := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 256, Parallel: 1, Threads: 1})
	first := complete(t, s, `{"prompt":"Hello","n_predict":1,"temperature":0,"return_tokens":true}`)
	require.Len(t, first.Tokens, 1)
	banned := complete(t, s, `{"prompt":"Hello","n_predict":1,"temperature":0,"return_tokens":true,"logit_bias":[[`+itoa(int(first.Tokens[0]))+`,false]]}`)
	require.NotEqual(t, first.Tokens, banned.Tokens)
	asMap := complete(t, s, `{"prompt":"Hello","n_predict":1,"temperature":0,"return_tokens":true,"logit_bias":{"`+itoa(int(first.Tokens[0]))+`":-100}}`)
	require.Equal(t, banned.Tokens, asMap.Tokens)
	code, b := post(t, s.URL()+"/completion", `{"prompt":"Hello","logit_bias":[[1,"x"]]}`)
	require.Equal(t, 400, code, string(b))

	code, b = post(t, s.URL()+"/apply-template", `{"messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, 200, code, string(b))
	require.Contains(t, string(b), "hi")
}

// A slot keeps the tokens of its last request: the next one that shares a
// prefix decodes only the rest (cache_prompt, llama-server's default), on
// the slot that holds it unless id_slot names another; the output is the
// uncached run's.
func TestPromptCacheReusesPrefix(t *testing.T) {
	s := loadedEngine(t, engine.Options{ModelPath: tinyModel(t), CtxSize: 1024, Parallel: 2, Threads: 1})
	history := strings.Repeat("the quick brown fox jumps over the lazy dog. ", 4)
	first := complete(t, s, `{"prompt":`+quote(history)+`,"n_predict":8,"temperature":0,"id_slot":1}`)
	assert.Equal(t, 1, first.IDSlot)
	assert.Zero(t, first.Timings.CacheN)
	require.Equal(t, "limit", first.StopType)
	assert.Equal(t, first.TokensEvaluated+first.TokensPredicted, first.TokensCached, "the prompt and the reply")
	assert.Equal(t, first.TokensEvaluated, first.Timings.PromptN)

	// The next turn: the history, the reply, a new question.
	turn := history + first.Content + " and then?"
	warm := complete(t, s, `{"prompt":`+quote(turn)+`,"n_predict":8,"temperature":0}`)
	assert.Equal(t, 1, warm.IDSlot, "the slot that holds the longest prefix")
	// Slot 1 holds the history and the reply: the reply's tokens as the
	// new prompt spells them may differ.
	assert.GreaterOrEqual(t, warm.Timings.CacheN, first.TokensEvaluated)
	assert.Less(t, warm.Timings.CacheN, warm.TokensEvaluated)
	assert.Equal(t, warm.TokensEvaluated-warm.Timings.CacheN, warm.Timings.PromptN)
	cold := complete(t, s, `{"prompt":`+quote(turn)+`,"n_predict":8,"temperature":0,"cache_prompt":false,"id_slot":0}`)
	assert.Zero(t, cold.Timings.CacheN, "cache_prompt false decodes it all")
	assert.Equal(t, cold.Content, warm.Content, "the cached prefix continues as the decoded one")
	t.Logf("turn 2: %d of %d prompt tokens from the cache", warm.Timings.CacheN, warm.TokensEvaluated)

	// The same prompt again: all but its last token reused.
	again := complete(t, s, `{"prompt":`+quote(turn)+`,"n_predict":8,"temperature":0}`)
	assert.Equal(t, again.TokensEvaluated-1, again.Timings.CacheN)
	assert.Equal(t, cold.Content, again.Content)

	for _, body := range []string{`{"prompt":"x","id_slot":2}`, `{"prompt":"x","id_slot":-2}`} {
		code, b := post(t, s.URL()+"/completion", body)
		assert.Equal(t, http.StatusBadRequest, code, body)
		assert.Contains(t, string(b), "id_slot", body)
	}
}
