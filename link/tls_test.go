package link

import (
	"context"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/config"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/testcerts"
	"github.com/llorch/llorch/tokenstream"
)

// A link with a certificate serves HTTPS and says so in its URL; a client
// that trusts the CA (--link-ca) reads its state and task streams, one
// that does not is refused with what to set, and plain HTTP gets nothing.
func TestLinkOverTLS(t *testing.T) {
	ca := testcerts.NewCA(t)
	cert, key := ca.Issue(t)
	serverTLS, err := config.ServerTLS{Cert: cert, Key: key}.Config()
	require.NoError(t, err)
	hub := &tokenstream.Hub{}
	f := serve(t, Options{Token: token, TLS: serverTLS, Streams: hub})
	f.url = f.srv.URL("")
	require.Regexp(t, `^https://127\.0\.0\.1:\d+$`, f.url)
	f.src.Set(facts(1))

	clientTLS, err := config.ClientTLS("--link-ca", ca.File)
	require.NoError(t, err)
	trusting := &Client{URL: f.url, Token: token, HTTP: config.WithClientTLS(DefaultHTTP, clientTLS)}
	st, err := trusting.State(context.Background())
	require.NoError(t, err)
	require.Equal(t, 1, st.Pools[0].SlotsBusy)

	st2 := hub.Open("t-tls", 0)
	_, err = st2.Push([]task.Event{{Type: "started", NodeID: "n1"}, tok(0), {Type: "end", TokensOut: 1}})
	require.NoError(t, err)
	var got []task.Event
	require.NoError(t, trusting.Events(context.Background(), "t-tls", -1, func(ev task.Event) error {
		got = append(got, ev)
		return nil
	}))
	require.Len(t, got, 3)

	_, err = f.client().State(context.Background()) // the system's roots only
	require.ErrorContains(t, err, "node link "+f.url)
	require.ErrorContains(t, err, "set --link-ca or LLORCH_LINK_CA to the PEM of the CA that signed it")
	err = f.client().Events(context.Background(), "t-tls", -1, func(task.Event) error { return nil })
	require.ErrorContains(t, err, "set --link-ca or LLORCH_LINK_CA")

	res, err := http.Get(URL("", f.srv.Addr()) + "/link/v1/state")
	if err == nil {
		res.Body.Close()
		require.Equal(t, http.StatusBadRequest, res.StatusCode, "plain HTTP to a TLS link gets Go's refusal, not the state")
	}
}
