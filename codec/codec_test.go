package codec

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	commonpb "go.temporal.io/api/common/v1"
	"go.temporal.io/sdk/converter"
	"google.golang.org/protobuf/encoding/protojson"
)

func mustParse(t *testing.T, spec string) *Codec {
	t.Helper()
	c, err := Parse(spec)
	require.NoError(t, err)
	return c
}

func TestEncryptsAndDecrypts(t *testing.T) {
	c := mustParse(t, NewKey("k1"))
	dc := DataConverter(c)
	p, err := dc.ToPayload(map[string]string{"prompt": "the secret prompt"})
	require.NoError(t, err)
	require.Equal(t, MetadataEncodingEncrypted, string(p.Metadata[converter.MetadataEncoding]))
	require.Equal(t, "k1", string(p.Metadata[MetadataEncryptionKeyID]))
	require.NotContains(t, string(p.Data), "secret")
	require.NotContains(t, p.String(), "json/plain", "the inner metadata is encrypted too")
	var back map[string]string
	require.NoError(t, dc.FromPayload(p, &back))
	require.Equal(t, "the secret prompt", back["prompt"])
}

func TestPlaintextPassesThrough(t *testing.T) {
	plain, err := converter.GetDefaultDataConverter().ToPayload("recorded before the codec")
	require.NoError(t, err)
	var s string
	require.NoError(t, DataConverter(mustParse(t, NewKey("k1"))).FromPayload(plain, &s))
	require.Equal(t, "recorded before the codec", s)
}

func TestRotation(t *testing.T) {
	k1, k2 := NewKey("id1"), NewKey("id2")
	old := mustParse(t, k1)
	enc1, err := old.Encode([]*commonpb.Payload{{Data: []byte("one")}})
	require.NoError(t, err)
	// id2 added first: it encrypts, id1 still decrypts.
	rotated := mustParse(t, k2+","+k1)
	require.Equal(t, "id2", rotated.KeyID())
	dec, err := rotated.Decode(enc1)
	require.NoError(t, err)
	require.Equal(t, "one", string(dec[0].Data))
	enc2, err := rotated.Encode([]*commonpb.Payload{{Data: []byte("two")}})
	require.NoError(t, err)
	require.Equal(t, "id2", string(enc2[0].Metadata[MetadataEncryptionKeyID]))
	// A process that only has id1 names the key it lacks.
	_, err = old.Decode(enc2)
	require.ErrorIs(t, err, ErrUnknownKey)
	require.Contains(t, err.Error(), `"id2"`)
}

func TestTamperedOrRelabeled(t *testing.T) {
	k1, k2 := NewKey("id1"), NewKey("id2")
	c := mustParse(t, k1+"\n"+k2)
	enc, err := c.Encode([]*commonpb.Payload{{Data: []byte("x")}})
	require.NoError(t, err)
	enc[0].Metadata[MetadataEncryptionKeyID] = []byte("id2")
	_, err = c.Decode(enc)
	require.ErrorContains(t, err, `key id "id2" does not decrypt`)
	enc[0].Data = enc[0].Data[:4]
	_, err = c.Decode(enc)
	require.ErrorContains(t, err, "truncated")
}

func TestParseRefusals(t *testing.T) {
	for spec, want := range map[string]string{
		"":                     "no codec key",
		"nokey":                "want id:base64key",
		"a:!!!":                "not base64",
		"a:" + "c2hvcnQ=":      "5 bytes, want 32",
		NewKey("a") + ",a:x":   "given twice",
		" :" + NewKey("b")[2:]: "want id:base64key",
	} {
		_, err := Parse(spec)
		require.ErrorContains(t, err, want, spec)
		require.NotContains(t, err.Error(), strings.TrimPrefix(NewKey("a"), "a:"))
	}
}

func TestServer(t *testing.T) {
	c := mustParse(t, NewKey("k1"))
	srv := httptest.NewServer(Handler(c, ServerOptions{Token: "sekret", UIOrigins: []string{"http://localhost:8233"}}))
	defer srv.Close()
	enc, err := DataConverter(c).ToPayloads("hello from the history")
	require.NoError(t, err)
	body, err := protojson.Marshal(enc)
	require.NoError(t, err)
	post := func(auth, path string) *http.Response {
		req, _ := http.NewRequest("POST", srv.URL+path, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", "http://localhost:8233")
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		return res
	}
	for _, auth := range []string{"", "Bearer wrong", "sekret"} {
		res := post(auth, "/decode")
		res.Body.Close()
		require.Equal(t, 401, res.StatusCode, auth)
	}
	res := post("Bearer sekret", "/decode")
	defer res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	require.Equal(t, "http://localhost:8233", res.Header.Get("Access-Control-Allow-Origin"))
	var raw json.RawMessage
	require.NoError(t, json.NewDecoder(res.Body).Decode(&raw))
	var dec commonpb.Payloads
	require.NoError(t, protojson.Unmarshal(raw, &dec))
	var s string
	require.NoError(t, converter.GetDefaultDataConverter().FromPayloads(&dec, &s))
	require.Equal(t, "hello from the history", s)

	// A preflight from the UI is answered without a token; another origin
	// gets no CORS grant.
	req, _ := http.NewRequest("OPTIONS", srv.URL+"/decode", nil)
	req.Header.Set("Origin", "http://evil.example")
	pre, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	pre.Body.Close()
	require.Empty(t, pre.Header.Get("Access-Control-Allow-Origin"))

	// No token configured: nothing is served.
	open := httptest.NewServer(Handler(c, ServerOptions{}))
	defer open.Close()
	res2, err := http.Post(open.URL+"/decode", "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	res2.Body.Close()
	require.Equal(t, 401, res2.StatusCode)
}
