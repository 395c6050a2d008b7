package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/bearer"
	"github.com/llorch/llorch/link"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/testenv"
)

const linkToken = "e2e-link-token"

// follow long-polls the link until cond holds, and returns that state.
func follow(t *testing.T, c *link.Client, timeout time.Duration, what string, cond func(node.LinkState) bool) node.LinkState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := c.State(ctx)
	for err == nil && !cond(st) {
		st, err = c.Watch(ctx, st.Version)
	}
	require.NoError(t, err, "%s: last state %+v", what, st)
	return st
}

// A worker serves its node link with the token and publishes the link's URL
// in its registration. The state shows a pool Ready with its slots once the
// pool starts, its slots busy while generations run and free after, and an
// idle node's long-poll answers at its bound, not at every heartbeat.
func TestNodeLink(t *testing.T) {
	c := newCluster(t, "LLORCH_LINK_TOKEN="+linkToken) // the scheduler follows the link too
	id := "e2e-link"
	w := c.onlineWorker(id, "LLORCH_LINK_TOKEN="+linkToken)
	inv, _ := c.node(id)["inventory"].(map[string]any)
	url, _ := inv["link_url"].(string)
	require.Regexp(t, `^http://127\.0\.0\.1:\d+$`, url, "GET /v2/nodes/{id} shows where the link is")
	require.Regexp(t, regexp.MustCompile(`node link listening.*url=`+regexp.QuoteMeta(url)), w.out.String())

	for _, tok := range []string{"", "wrong"} {
		_, err := (&link.Client{URL: url, Token: tok}).State(context.Background())
		var ae *apiclient.Error
		require.ErrorAs(t, err, &ae)
		require.Equal(t, 401, ae.Status)
	}
	// The log line comes before the answer; the pipe to w.out may lag.
	testenv.Eventually(t, 5*time.Second, "the refusal logged with the caller's fingerprint", func() (bool, string) {
		return strings.Contains(w.out.String(), "presented="+bearer.Fingerprint("wrong")), ""
	})
	require.NotContains(t, w.out.String(), "presented="+bearer.Fingerprint(linkToken))

	lc := &link.Client{URL: url, Token: linkToken}
	st, err := lc.State(context.Background())
	require.NoError(t, err)
	require.Equal(t, id, st.NodeID)
	require.Empty(t, st.Pools)

	c.push("link-slow", slowModel(t))
	status, body := c.send("POST", "/v2/pools", `{"pool_id":"lp1","model_id":"link-slow","node_id":"`+id+`","ctx":4096,"slots":2}`)
	require.Equal(t, 202, status, body)
	h := c.waitPool("lp1", pool.Ready, 120*time.Second)
	st = follow(t, lc, 10*time.Second, "pool lp1 ready on the link", func(s node.LinkState) bool {
		return len(s.Pools) == 1 && s.Pools[0].Ready
	})
	p := st.Pools[0]
	require.Equal(t, node.LinkPool{PoolID: "lp1", ModelID: "link-slow", Epoch: p.Epoch, URL: h["url"].(string),
		Ready: true, SlotsTotal: 2}, p)
	require.NotEmpty(t, st.Models, "the staged model")

	// Idle: figures refresh every second without waking the follower.
	lc.Wait = 3 * time.Second
	answers, start := 0, time.Now()
	for v := st.Version; time.Since(start) < 3*time.Second; answers++ {
		idle, err := lc.Watch(context.Background(), v)
		require.NoError(t, err)
		v = idle.Version
	}
	require.LessOrEqual(t, answers, 2, "an idle node's long-poll answers at its bound")

	for _, task := range []string{"link-t1", "link-t2"} {
		status, body := c.submit(`{"task_id":"` + task + `","model_ref":"link-slow","prompt":"the","max_tokens":2000}`)
		require.Equal(t, 202, status, body)
	}
	follow(t, lc, 60*time.Second, "both slots busy", func(s node.LinkState) bool {
		return len(s.Pools) == 1 && s.Pools[0].SlotsBusy == 2
	})
	for _, task := range []string{"link-t1", "link-t2"} {
		status, _ := c.send("POST", "/v2/tasks/"+task+"/cancel", "")
		require.Equal(t, 204, status)
	}
	st = follow(t, lc, 30*time.Second, "slots free after cancel", func(s node.LinkState) bool {
		return len(s.Pools) == 1 && s.Pools[0].SlotsBusy == 0
	})
	require.True(t, st.Pools[0].Ready)
	require.NotContains(t, w.out.String(), linkToken, "the token is never logged")
	require.False(t, strings.Contains(fmt.Sprint(c.node(id)), linkToken), "nor registered")
	c.leave(w, id)
}

// With the default 10 s heartbeat (30 s until a missed-beat timeout), a
// killed worker is Offline within seconds all the same: the apiserver
// following its link sees the connection fail, signals a suspicion, and
// the node workflow's probe on the node's queue goes unanswered. A live
// node the apiserver merely lost (its link restarted elsewhere) answers
// the probe and stays Online.
func TestKillDetectedByLink(t *testing.T) {
	c := newCluster(t)
	id := "e2e-link-kill"
	const rounds = 3
	var times []time.Duration
	w := c.worker(id, "--heartbeat-interval", "10s")
	for i := 0; i < rounds; i++ {
		c.waitState(id, node.Online, 60*time.Second)
		// The view holds a long-poll on this worker's link before the kill
		// (membership is listed once a second; a restarted worker's new
		// link is learned after the old one's retry backoff).
		testenv.Eventually(t, 20*time.Second, "apiserver follows the link", func() (bool, string) {
			m := c.metrics()
			return strings.Contains(m, "\nllorch_view_links 1\n") && strings.Contains(m, "\nllorch_view_age_seconds 0\n"), m
		})
		w.signal(t, syscall.SIGKILL)
		w.wait(t, 10*time.Second)
		times = append(times, c.waitState(id, node.Offline, 20*time.Second))
		if i == 0 {
			recordHistory(t, node.WorkflowID(id), "node-suspected-offline")
		}
		w = c.worker(id, "--heartbeat-interval", "10s")
	}
	slices.Sort(times)
	t.Logf("kill -9 to Offline over %d kills (heartbeat 10s, timeout 30s; by the link and a %s probe): median %s, max %s, all %v",
		rounds, node.ProbeTimeout, times[rounds/2], times[rounds-1], times)
	require.Less(t, times[rounds-1], 10*time.Second, "detected by the link, not by the 30 s heartbeat timeout")
	c.waitState(id, node.Online, 30*time.Second) // the restarted worker brings the node back
	n := c.node(id)
	var reasons []string
	for _, tr := range n["transitions"].([]any) {
		reasons = append(reasons, fmt.Sprint(tr.(map[string]any)["reason"]))
	}
	require.Contains(t, strings.Join(reasons, "\n"), "no answer to a probe", "Offline by the probe: %v", reasons)
}

// metrics is the apiserver's /metrics page.
func (c *cluster) metrics() string {
	req, _ := http.NewRequest(http.MethodGet, "http://"+c.api+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	return string(raw)
}
