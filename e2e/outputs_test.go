package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/llorch/llorch/codec"
	"github.com/llorch/llorch/modelstore"
	"github.com/llorch/llorch/outputs"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testenv"
)

// An output above the worker's --max-inline-output goes to the bucket:
// the task completes, its history holds a reference (no text), the object
// is encrypted with the cluster's codec key; GET /v2/tasks/{id}, /v1
// non-streaming and a replica that never saw the stream serve the whole
// text; a tampered object is refused with OUTPUT_CORRUPT (never other
// text); the apiserver's --output-retention deletes it, and the task then
// reads as 410 OUTPUT_EXPIRED.
func TestLargeOutputInBucket(t *testing.T) {
	c := newCluster(t)
	id := "e2e-outputs"
	c.onlineWorker(id, "--max-inline-output", "1KiB")
	h := c.readyPool(id, "outp1", "out-tiny", 63, `,"slots":2,"ctx":4096`)
	url := h["url"].(string)
	const prompt, n = "Once upon a time", 200
	want := greedy(t, url, prompt, n)

	tid := testenv.Unique("t-big")
	status, body := c.submit(fmt.Sprintf(`{"task_id":%q,"model_ref":"out-tiny","prompt":%q,"max_tokens":%d,"determinism":"strict"}`, tid, prompt, n))
	require.Equal(t, 202, status, body)
	ch, stop := c.events(tid, "")
	evs, text := collect(t, ch, 120*time.Second)
	stop()
	require.Equal(t, "end", evs[len(evs)-1].Name)
	require.Equal(t, want, text)
	var rec map[string]any
	testenv.Eventually(t, 30*time.Second, "task recorded", func() (bool, string) {
		_, rec = c.get("/v2/tasks/" + tid)
		return rec["state"] == "Completed", fmt.Sprint(rec)
	})
	require.Equal(t, want, rec["text"], "GET reads the text back from the bucket")
	require.EqualValues(t, n, rec["tokens_out"])
	require.NotContains(t, rec, "output", "the reference is not the API's")

	// The raw history: the generation's result and the workflow's hold
	// the reference, not the text.
	hist := history(t, task.WorkflowID(tid), "")
	require.NoError(t, env.Codec.DecodeMessage(context.Background(), hist))
	raw, err := protojson.Marshal(hist)
	require.NoError(t, err)
	snippet := want[len(want)/2 : len(want)/2+30]
	require.NotContains(t, string(raw), snippet, "no output text in the decoded history")
	var st task.Status
	var res task.Result
	for _, e := range hist.GetEvents() {
		switch e.GetEventType() {
		case enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
			require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(e.GetWorkflowExecutionCompletedEventAttributes().GetResult(), &st))
		case enumspb.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
			var r task.Result
			if converter.GetDefaultDataConverter().FromPayloads(e.GetActivityTaskCompletedEventAttributes().GetResult(), &r) == nil && r.Output != nil {
				res = r
			}
		}
	}
	require.NotNil(t, st.Output, "the workflow's result holds the reference")
	require.Empty(t, st.Text)
	require.Empty(t, st.Pieces)
	require.Equal(t, n, st.TokensOut)
	require.NotNil(t, res.Output, "the generation's result holds the reference")
	require.Equal(t, st.Output, res.Output)
	require.Empty(t, res.Tokens)
	ref := *st.Output
	require.True(t, strings.HasPrefix(ref.Key, outputs.Prefix+tid+"/"), ref.Key)

	// The object: an encrypted payload under the cluster's key, its
	// checksum the one in history.
	store, err := modelstore.New(env.S3)
	require.NoError(t, err)
	obj := testenv.ReadObject(t, store.Client, store.Bucket, ref.Key)
	sum := sha256.Sum256(obj)
	require.Equal(t, ref.SHA256, hex.EncodeToString(sum[:]))
	require.NotContains(t, string(obj), snippet)
	var p commonpb.Payload
	require.NoError(t, proto.Unmarshal(obj, &p))
	require.Equal(t, codec.MetadataEncodingEncrypted, string(p.GetMetadata()[converter.MetadataEncoding]))
	require.Equal(t, env.Codec.KeyID(), string(p.GetMetadata()[codec.MetadataEncryptionKeyID]))

	// /v1 non-streaming: the whole text, read back from the bucket.
	status, v1 := c.send("POST", "/v1/completions", fmt.Sprintf(`{"model":"out-tiny","prompt":%q,"max_tokens":%d,"temperature":0}`, prompt, n))
	require.Equal(t, 200, status, v1)
	v1Text := v1["choices"].([]any)[0].(map[string]any)["text"].(string)
	require.Equal(t, want, v1Text)
	v1Task := strings.TrimPrefix(v1["id"].(string), "cmpl-")
	v1Ref := refOf(t, v1Task)

	// A replica that never saw either stream finishes it from the record.
	addr := c.extraAPI()
	evs, text = collect(t, testenvFollow(t, addr, tid), 60*time.Second)
	require.Equal(t, "end", evs[len(evs)-1].Name)
	require.Equal(t, want, text, "another replica's stream reads the text back from the bucket")

	// Tampered: one byte flipped in the ciphertext. Refused, never served.
	bad := append([]byte(nil), obj...)
	bad[len(bad)-1] ^= 1
	testenv.PutObject(t, store.Client, store.Bucket, ref.Key, bad)
	status, body = c.send("GET", "/v2/tasks/"+tid, "")
	require.Equal(t, 500, status, body)
	require.Equal(t, task.ErrOutputCorrupt, body["code"], body)
	require.Contains(t, body["message"], "sha256")
	testenv.PutObject(t, store.Client, store.Bucket, v1Ref.Key, obj) // the first task's valid object in its place
	evs, _ = collect(t, testenvFollow(t, addr, v1Task), 60*time.Second)
	last := evs[len(evs)-1]
	require.Equal(t, "error", last.Name, "%v", evs)
	require.Equal(t, task.ErrOutputCorrupt, last.Data["code"], "%v", last.Data)
	for _, ev := range evs {
		require.NotEqual(t, "token", ev.Name, "no token of a refused output")
	}

	// The retention: a replica with a short one deletes both objects.
	apiWith(t, c, "--output-retention", "1s")
	testenv.Eventually(t, 30*time.Second, "outputs pruned", func() (bool, string) {
		for _, k := range []string{ref.Key, v1Ref.Key} {
			if _, err := store.Stat(context.Background(), k); err == nil {
				return false, k + " still there"
			}
		}
		return true, ""
	})
	status, body = c.send("GET", "/v2/tasks/"+tid, "")
	require.Equal(t, 410, status, body)
	require.Equal(t, task.ErrOutputExpired, body["code"], body)
	status, body = c.send("POST", "/v2/tasks/"+tid+"/cancel", "")
	require.Equal(t, 409, status, "an ended task whose output expired is still ended: %v", body)
	require.Equal(t, "TASK_ENDED", body["code"], body)
}

func testenvFollow(t *testing.T, addr, taskID string) <-chan sseEvent {
	ch, stop := testenv.Follow(t, addr, token, taskID, "")
	t.Cleanup(stop)
	return ch
}

// refOf is the output reference a finished task's workflow result holds.
func refOf(t *testing.T, taskID string) task.OutputRef {
	t.Helper()
	var st task.Status
	require.NoError(t, env.Temporal.GetWorkflow(context.Background(), task.WorkflowID(taskID), "").Get(context.Background(), &st))
	require.NotNil(t, st.Output, "task %s: no reference", taskID)
	return *st.Output
}

// apiWith starts another apiserver with extra flags (the last of a flag
// given twice wins) and waits for its /health; its address.
func apiWith(t *testing.T, c *cluster, extra ...string) string {
	t.Helper()
	saved := c.apiArgs
	c.apiArgs = append(append([]string(nil), saved...), extra...)
	defer func() { c.apiArgs = saved }()
	return c.extraAPI()
}
