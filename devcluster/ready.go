package devcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
)

// probe is one readiness check; nil means ready.
type probe func(ctx context.Context) error

// temporalReady is ready once the frontend answers a health check and the UI
// accepts connections: a bare TCP accept on the gRPC port comes before the
// server can serve.
func temporalReady(grpcAddr, uiAddr string) probe {
	quiet := tlog.NewStructuredLogger(slog.New(slog.DiscardHandler))
	return func(ctx context.Context) error {
		c, err := client.DialContext(ctx, client.Options{HostPort: grpcAddr, Namespace: "default", Logger: quiet})
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.CheckHealth(ctx, nil); err != nil {
			return err
		}
		return tcpReady(uiAddr)(ctx)
	}
}

func tcpReady(addr string) probe {
	return func(ctx context.Context) error {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

func s3Client(endpoint, access, secret string) (*minio.Client, error) {
	return minio.New(endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(access, secret, ""),
		Region: "us-east-1",
		// waitReady does the retrying; minio's own backoff would hide a
		// dead server for seconds inside one probe.
		MaxRetries: 1,
	})
}

// s3Ready is ready once a signed ListBuckets succeeds, which also proves the
// keys we handed versitygw are the ones it uses.
func s3Ready(mc *minio.Client) probe {
	return func(ctx context.Context) error {
		_, err := mc.ListBuckets(ctx)
		return err
	}
}

// ensureBucket creates the models bucket unless a previous run did.
func ensureBucket(ctx context.Context, mc *minio.Client, bucket string) (created bool, err error) {
	ok, err := mc.BucketExists(ctx, bucket)
	if err != nil {
		return false, fmt.Errorf("check bucket %s: %w", bucket, err)
	}
	if ok {
		return false, nil
	}
	if err := mc.MakeBucket(ctx, bucket, minio.MakeBucketOptions{}); err != nil {
		return false, fmt.Errorf("create bucket %s: %w", bucket, err)
	}
	return true, nil
}

var httpc = &http.Client{Timeout: 5 * time.Second}

// httpOK is ready on a 200.
func httpOK(url string) probe {
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := httpc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	}
}

// nodeState asks the apiserver for one node's state.
func nodeState(ctx context.Context, apiURL, token, nodeID string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/v2/nodes/"+nodeID, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := httpc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /v2/nodes/%s: %s", nodeID, resp.Status)
	}
	var v struct {
		State string `json:"state"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return "", err
	}
	return v.State, nil
}
