package engines

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Environment variables that mark an engine process as a node's and a
// pool's, so fencing and adoption recognise it from /proc/<pid>/environ
// without trusting a bare pid.
const (
	EnvNodeID    = "LLORCH_ENGINE_NODE"
	EnvPoolID    = "LLORCH_POOL_ID"
	EnvPoolEpoch = "LLORCH_POOL_EPOCH"
)

// Live is an engine process found in /proc by its markers.
type Live struct {
	PoolID string
	Epoch  int64
	PID    int
}

// Live lists the engine processes of t's node, whoever started them: those
// carry EnvNodeID=<node> in their environment.
func (t *Table) Live() []Live {
	return scan(func(env map[string]string) bool { return env[EnvNodeID] == t.NodeID })
}

// OfPool lists the engine processes of a pool on this machine, of
// whichever node.
func OfPool(poolID string) []Live {
	return scan(func(env map[string]string) bool { return env[EnvPoolID] == poolID })
}

// scan lists the live engine processes whose markers keep accepts.
func scan(keep func(env map[string]string) bool) []Live {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []Live
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, ok := markersOf(pid)
		if !ok || !keep(env) {
			continue
		}
		epoch, _ := strconv.ParseInt(env[EnvPoolEpoch], 10, 64)
		out = append(out, Live{PoolID: env[EnvPoolID], Epoch: epoch, PID: pid})
	}
	return out
}

// markersOf reads the llorch markers of a live (not zombie) process.
func markersOf(pid int) (map[string]string, bool) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, false
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return nil, false
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil, false
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(raw, []byte{0}) {
		k, v, ok := bytes.Cut(kv, []byte{'='})
		if !ok {
			continue
		}
		switch string(k) {
		case EnvNodeID, EnvPoolID, EnvPoolEpoch:
			env[string(k)] = string(v)
		}
	}
	return env, env[EnvPoolID] != ""
}

// engineInherits says whether an engine may inherit the worker's env var
// k: the process basics, locale, the library search path, the built-in
// engine's own settings, and the GPU runtimes' and llama.cpp's knobs.
func engineInherits(k string) bool {
	switch k {
	case "CUDA_VISIBLE_DEVICES", EnvNodeID, EnvPoolID, EnvPoolEpoch:
		return false // set for the engine
	case "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ", "LANG", "LD_LIBRARY_PATH",
		"LLORCH_LLAMA_LIB_DIR", "LLORCH_LOG_FORMAT", "LLORCH_LOG_LEVEL":
		return true
	}
	for _, p := range []string{"LC_", "CUDA_", "NVIDIA_", "GGML_", "LLAMA_ARG_", "HIP_", "ROCR_", "HSA_", "OMP_", "VK_", "ONEAPI_", "SYCL_", "ZE_"} {
		if strings.HasPrefix(k, p) {
			return true
		}
	}
	return false
}

// isEngine says whether pid is a live engine of t's node's pool at epoch
// (any epoch when epoch is 0): a reused pid is never mistaken for one.
func (t *Table) isEngine(pid int, poolID string, epoch int64) bool {
	env, ok := markersOf(pid)
	if !ok || env[EnvNodeID] != t.NodeID || env[EnvPoolID] != poolID {
		return false
	}
	return epoch == 0 || env[EnvPoolEpoch] == strconv.FormatInt(epoch, 10)
}

// engineEnv is what an engine runs with: the allowlisted part of the
// worker's environment (engineInherits), the GPU mask and the pool
// markers. Nothing else reaches it: not the S3 or Temporal credentials,
// not the API or link tokens, whatever the worker was started with.
func engineEnv(base []string, nodeID, mask, poolID string, epoch int64) []string {
	env := make([]string, 0, len(base)+3)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !engineInherits(k) {
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"CUDA_VISIBLE_DEVICES="+mask,
		EnvNodeID+"="+nodeID,
		EnvPoolID+"="+poolID,
		EnvPoolEpoch+"="+strconv.FormatInt(epoch, 10))
}
