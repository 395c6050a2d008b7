package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// A pool created with embeddings serves them (its engine answers
// /v1/embeddings; the built-in one refuses generations), its health
// says so, and no generation is placed on it: a task pinned there is
// refused, POOL_UNAVAILABLE.
func TestEmbeddingsPool(t *testing.T) {
	embeddingsPool(t, "")
}

// The same with a llama-server pool (LLORCH_LLAMA_SERVER): --embeddings
// --pooling mean.
func TestEmbeddingsPoolOnLlamaServer(t *testing.T) {
	embeddingsPool(t, llamaServerOrSkip(t, "an embeddings pool is not tried on llama-server"))
}

func embeddingsPool(t *testing.T, llamaServer string) {
	c := newCluster(t)
	id := "e2e-embed"
	args, engine := engineOf(llamaServer)
	spec := `,"embeddings":true,"slots":2,"ctx":512` + engine
	w := c.onlineWorker(id, args...)
	h := c.readyPool(id, "ep1", "embed-tiny", 95, spec)
	require.Equal(t, true, h["embeddings"], h)

	res, err := http.Post(h["url"].(string)+"/v1/embeddings", "application/json", strings.NewReader(`{"input":["hello there","the cat"]}`))
	require.NoError(t, err)
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode, string(b))
	var e struct {
		Data []struct {
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(b, &e))
	require.Len(t, e.Data, 2)
	require.NotEmpty(t, e.Data[0].Embedding)
	if llamaServer == "" {
		// llama-server (d32676d) still answers /completion with
		// --embeddings, which its help says it restricts; placement keeps
		// generations off such pools either way (below).
		res, err = http.Post(h["url"].(string)+"/completion", "application/json", strings.NewReader(`{"prompt":"x","n_predict":2}`))
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, 501, res.StatusCode, "an embeddings engine generates nothing")
	}

	status, body := c.submit(`{"model_ref":"embed-tiny","prompt":"x","placement":{"mode":"pin","pin_pool_id":"ep1"}}`)
	require.Equal(t, 503, status, body)
	require.Equal(t, "POOL_UNAVAILABLE", body["code"], body)
	c.leave(w, id)
}
