package engines

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// An engine inherits only the allowlisted part of its worker's
// environment: whatever secrets the worker holds stay with it.
func TestEngineEnvIsAllowlisted(t *testing.T) {
	worker := []string{
		"PATH=/usr/bin", "HOME=/root", "LANG=C.UTF-8", "LC_ALL=C", "LD_LIBRARY_PATH=/opt/lib",
		"CUDA_DEVICE_ORDER=PCI_BUS_ID", "NVIDIA_DRIVER_CAPABILITIES=compute", "GGML_CUDA_NO_PINNED=1",
		"LLORCH_LLAMA_LIB_DIR=/opt/llama", "LLORCH_LOG_LEVEL=debug",
		"CUDA_VISIBLE_DEVICES=0,1,2,3", EnvPoolID + "=stale",
		"LLORCH_S3_SECRET_KEY=s3-secret", "LLORCH_S3_ACCESS_KEY=s3-access", "AWS_SECRET_ACCESS_KEY=aws",
		"LLORCH_TEMPORAL_API_KEY=temporal", "LLORCH_API_TOKEN=api", "LLORCH_LINK_TOKEN=link",
		"LLORCH_TEMPORAL_TLS_KEY=/keys/tls.key", "SSH_AUTH_SOCK=/tmp/agent",
	}
	env := engineEnv(worker, "n1", "2", "p1", 7)
	require.Equal(t, []string{
		"PATH=/usr/bin", "HOME=/root", "LANG=C.UTF-8", "LC_ALL=C", "LD_LIBRARY_PATH=/opt/lib",
		"CUDA_DEVICE_ORDER=PCI_BUS_ID", "NVIDIA_DRIVER_CAPABILITIES=compute", "GGML_CUDA_NO_PINNED=1",
		"LLORCH_LLAMA_LIB_DIR=/opt/llama", "LLORCH_LOG_LEVEL=debug",
		"CUDA_VISIBLE_DEVICES=2", EnvNodeID + "=n1", EnvPoolID + "=p1", EnvPoolEpoch + "=7",
	}, env)
}
