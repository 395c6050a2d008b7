package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/proxy"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

// Every payload of a task's history is encrypted (the raw history, read
// with no codec, holds neither the prompt nor the output); the generation's
// heartbeat is a count whatever the output's length; `llorch codec-server`
// decodes the history for a holder of its token (401 otherwise), with a
// rotated key list (a new key first, the old one still decrypting).
func TestPayloadsEncrypted(t *testing.T) {
	c := newCluster(t)
	id := "e2e-codec"
	c.onlineWorker(id)
	c.slowPool(id, "cp1", "codec-model")

	prompt := "the zebra-" + fmt.Sprintf("%x", testenv.RandomBytes(t, 4))
	tid := testenv.Unique("t-codec")
	status, body := c.submit(fmt.Sprintf(`{"task_id":%q,"model_ref":"codec-model","prompt":%q,"max_tokens":600,"determinism":"strict"}`, tid, prompt))
	require.Equal(t, 202, status, body)
	ch, stop := c.events(tid, "")
	defer stop()

	// Mid-stream, the pending Generate's heartbeat: encrypted, a count.
	var beat task.Progress
	var beatBytes int
	testenv.Eventually(t, 60*time.Second, "a heartbeat with a count", func() (bool, string) {
		d, err := env.Temporal.DescribeWorkflowExecution(context.Background(), task.WorkflowID(tid), "")
		if err != nil {
			return false, err.Error()
		}
		for _, pa := range d.GetPendingActivities() {
			hb := pa.GetHeartbeatDetails()
			if hb == nil {
				continue
			}
			for _, p := range hb.GetPayloads() {
				require.Equal(t, codec.MetadataEncodingEncrypted, string(p.GetMetadata()[converter.MetadataEncoding]))
			}
			beatBytes = len(hb.GetPayloads()[0].GetData())
			beat = task.Progress{}
			require.NoError(t, codec.DataConverter(env.Codec).FromPayloads(hb, &beat))
			return beat.Produced >= 100, fmt.Sprint(beat)
		}
		return false, "no heartbeat yet"
	})
	require.Empty(t, beat.Tokens, "the heartbeat holds no tokens")
	require.Less(t, beatBytes, 256, "a heartbeat of %d tokens takes %d bytes", beat.Produced, beatBytes)

	evs, text := collect(t, ch, 120*time.Second)
	require.Equal(t, "end", evs[len(evs)-1].Name)
	require.GreaterOrEqual(t, len(text), 100)
	var rec map[string]any
	testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
		_, rec = c.get("/v2/tasks/" + tid)
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	require.Equal(t, text, rec["text"], "the API reads the encrypted result back")

	// The raw history: every payload but the search attributes encrypted,
	// no plaintext prompt or output in any of them.
	h := history(t, task.WorkflowID(tid), "")
	snippet := text[len(text)/2 : len(text)/2+40]
	n := 0
	require.NoError(t, proxy.VisitPayloads(context.Background(), h, proxy.VisitPayloadsOptions{SkipSearchAttributes: true,
		Visitor: func(_ *proxy.VisitPayloadsContext, ps []*commonpb.Payload) ([]*commonpb.Payload, error) {
			for _, p := range ps {
				n++
				require.Equal(t, codec.MetadataEncodingEncrypted, string(p.GetMetadata()[converter.MetadataEncoding]), "%v", p)
				require.NotContains(t, string(p.GetData()), prompt)
				require.NotContains(t, string(p.GetData()), snippet)
			}
			return ps, nil
		}}))
	require.Greater(t, n, 3)
	raw, err := protojson.Marshal(h)
	require.NoError(t, err)
	require.NotContains(t, string(raw), prompt)

	// The codec server, its key list rotated: a new key first, the
	// cluster's still there.
	port, err := testenv.FreePort()
	require.NoError(t, err)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	srvToken := "codec-" + fmt.Sprintf("%x", testenv.RandomBytes(t, 8))
	keys := codec.NewKey("next") + "," + env.CodecKeys
	srv := startEnv(t, "codec-server", []string{codec.EnvKeys + "=" + keys, codec.EnvServerToken + "=" + srvToken},
		"codec-server", "--addr", addr, "--ui-origin", "http://localhost:8233", "--home", c.home)
	input := h.GetEvents()[0].GetWorkflowExecutionStartedEventAttributes().GetInput()
	post := func(path, auth string, ps *commonpb.Payloads) (int, *commonpb.Payloads) {
		b, err := protojson.Marshal(ps)
		require.NoError(t, err)
		req, _ := http.NewRequest("POST", "http://"+addr+path, bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Namespace", "default")
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil
		}
		defer res.Body.Close()
		if res.StatusCode != 200 {
			return res.StatusCode, nil
		}
		var out json.RawMessage
		require.NoError(t, json.NewDecoder(res.Body).Decode(&out))
		var dec commonpb.Payloads
		require.NoError(t, protojson.Unmarshal(out, &dec))
		return 200, &dec
	}
	testenv.Eventually(t, 30*time.Second, "codec server up", func() (bool, string) {
		st, _ := post("/decode", "", input)
		return st == 401, fmt.Sprint(st, srv.out.String())
	})
	st, _ := post("/decode", "Bearer wrong", input)
	require.Equal(t, 401, st)
	st, dec := post("/decode", "Bearer "+srvToken, input)
	require.Equal(t, 200, st)
	var req task.Request
	require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(dec, &req))
	require.Equal(t, prompt, req.Prompt)
	var res task.Status
	for _, e := range h.GetEvents() {
		if e.GetEventType() == enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED {
			st, dec = post("/decode", "Bearer "+srvToken, e.GetWorkflowExecutionCompletedEventAttributes().GetResult())
			require.Equal(t, 200, st)
			require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(dec, &res))
		}
	}
	require.Equal(t, text, res.Text)
	// Encoding uses the first key of the list.
	plain, err := converter.GetDefaultDataConverter().ToPayloads("x")
	require.NoError(t, err)
	st, enc := post("/encode", "Bearer "+srvToken, plain)
	require.Equal(t, 200, st)
	require.Equal(t, "next", string(enc.GetPayloads()[0].GetMetadata()[codec.MetadataEncryptionKeyID]))
	require.True(t, strings.Contains(srv.out.String(), "codec server listening"))
}
