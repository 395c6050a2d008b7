package balancer

import (
	"crypto/tls"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/testcerts"
	"github.com/llorch/llorch/testenv"
)

// The balancer fronts apiservers that serve HTTPS with a private CA's
// certificate (--tls-cert): it verifies them with BackendTLS, and without
// the CA it forwards nothing and answers in the error envelope.
func TestTLSBackends(t *testing.T) {
	ca := testcerts.NewCA(t)
	certFile, keyFile := ca.Issue(t)
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	require.NoError(t, err)
	var reached int
	back := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached++
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"backend":"tls","auth":"`+r.Header.Get("Authorization")+`"}`)
	}))
	back.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	back.Config.ErrorLog = log.New(io.Discard, "", 0)
	back.StartTLS()
	t.Cleanup(back.Close)

	_, lb := front(t, []string{back.URL}, Options{BackendTLS: &tls.Config{RootCAs: ca.Pool()}})
	status, _, body := call(t, http.DefaultClient, "GET", lb.URL+"/v2/nodes", "", map[string]string{"Authorization": "Bearer k"})
	require.Equal(t, 200, status, body)
	require.Equal(t, map[string]any{"backend": "tls", "auth": "Bearer k"}, body)

	logs := &testenv.Buffer{}
	_, untrusting := front(t, []string{back.URL}, Options{Logger: slog.New(slog.NewTextHandler(logs, nil))})
	status, _, body = call(t, http.DefaultClient, "GET", untrusting.URL+"/v2/nodes", "", nil)
	require.Equal(t, http.StatusServiceUnavailable, status, body)
	require.Equal(t, CodeUnavailable, body["code"])
	require.Contains(t, logs.String(), "certificate signed by unknown authority", "the log says why the replica is down")
	require.Equal(t, 1, reached, "nothing reaches a backend the balancer cannot verify")
}
