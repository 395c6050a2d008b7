package e2e

import (
	"crypto/tls"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/testcerts"
	"github.com/llorch/llorch/testenv"
)

// TLS end to end, with a private CA made here: two apiservers serve HTTPS
// (--tls-cert), the balancer fronts them over TLS, the worker's node link
// serves HTTPS (--link-tls-cert) and advertises an https URL, and the
// apiservers trust it with --link-ca: the scheduler sees the pool Ready
// through the link and a task's tokens reach the client through it. The
// models CLI reaches a replica with --api-ca, and without it fails naming
// the setting.
func TestTLSEndToEnd(t *testing.T) {
	ca := testcerts.NewCA(t)
	apiCert, apiKey := ca.Issue(t)
	linkCert, linkKey := ca.Issue(t)
	c := newClusterTLS(t, 2, &tls.Config{RootCAs: ca.Pool()}, "--tls-cert", apiCert, "--tls-key", apiKey,
		"--link-ca", ca.File, "LLORCH_LINK_TOKEN="+linkToken)
	id := "e2e-tls"
	w := c.onlineWorker(id, "--link-tls-cert", linkCert, "--link-tls-key", linkKey, "LLORCH_LINK_TOKEN="+linkToken)
	inv, _ := c.node(id)["inventory"].(map[string]any)
	require.Regexp(t, `^https://127\.0\.0\.1:\d+$`, inv["link_url"], "the registration advertises the TLS link")

	c.readyPool(id, "tls-p", "tls-tiny", 71, `,"slots":1`)
	status, body := c.submit(`{"task_id":"t-tls","model_ref":"tls-tiny","prompt":"Once upon a time","max_tokens":16}`)
	require.Equal(t, 202, status, body)
	ch, stop := c.events("t-tls", "")
	evs, text := collect(t, ch, 60*time.Second)
	stop()
	require.Equal(t, 16, checkOrder(t, evs, 0), "every token came through the TLS link")
	require.NotEmpty(t, text)
	for i, r := range c.replicas {
		require.NotContains(t, r.out.String(), "x509", "replica %d trusts the link's CA", i+1)
	}
	require.NotContains(t, w.out.String(), "TLS handshake error", "no caller of the link failed its handshake")

	// The CLI, straight to a replica: with the CA, and without.
	replica := c.replicaURL(c.replicaAddrs[0])
	models := func(args ...string) (string, error) {
		cmd := exec.Command(testenv.Llorch(t), append([]string{"models", "ls", "--home", c.home, "--api-url", replica}, args...)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LLORCH_API_TOKEN=" + token}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := models("--api-ca", ca.File)
	require.NoError(t, err, out)
	require.Contains(t, out, "tls-tiny")
	out, err = models()
	require.Error(t, err, out)
	require.Contains(t, out, "set --api-ca or LLORCH_API_CA", "an untrusted certificate names the setting")

	// Plain HTTP to a TLS replica gets no API answer.
	res, err := c.replicaHTTP().Get(strings.Replace(replica, "https://", "http://", 1) + "/v2/nodes")
	if err == nil {
		res.Body.Close()
		require.NotEqual(t, 200, res.StatusCode, fmt.Sprint(res.Header))
	}
}
