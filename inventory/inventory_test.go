package inventory

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/stretchr/testify/require"
)

const gib = uint64(1) << 30

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func h100(t *testing.T) *server.Server {
	t.Helper()
	lib, err := Mock("dgxh100")
	require.NoError(t, err)
	srv, ok := lib.(*server.Server)
	require.True(t, ok, "Mock returns %T", lib)
	return srv
}

func setUsed(srv *server.Server, i int, used uint64) {
	srv.Devices[i].(*server.Device).MemoryInfo.Used = used
}

func TestInventoryDGXH100(t *testing.T) {
	srv := h100(t)
	setUsed(srv, 0, 10*gib)
	setUsed(srv, 3, 40*gib)

	c, err := New(Options{
		NVML: srv, ModelDir: t.TempDir(), MachineID: "m-1",
		Address: "10.0.0.7:9000", Version: "v1.2.3", Logger: quietLogger(),
	})
	require.NoError(t, err)
	t.Cleanup(c.Shutdown)
	require.False(t, c.CPUOnly())

	inv := c.Inventory()
	require.False(t, inv.CPUOnly)
	require.Empty(t, inv.NVMLError)
	require.Equal(t, "550.54.15", inv.DriverVersion)
	require.Equal(t, "m-1", inv.MachineID)
	require.Equal(t, "10.0.0.7:9000", inv.Address)
	require.Equal(t, "v1.2.3", inv.Version)
	require.NotEmpty(t, inv.Hostname)
	require.Positive(t, inv.CPUCores)
	require.Positive(t, inv.MemoryTotalBytes)
	require.Positive(t, inv.DiskFreeBytes)
	require.False(t, inv.CollectedAt.IsZero())
	require.Equal(t, "UTC", inv.CollectedAt.Location().String())

	require.Len(t, inv.GPUs, 8)
	total := uint64(81920) << 20 // 80 GiB as the mock defines it
	uuids := map[string]bool{}
	for i, g := range inv.GPUs {
		require.Equal(t, i, g.Index)
		require.Equal(t, "NVIDIA H100 80GB HBM3", g.Name)
		require.True(t, strings.HasPrefix(g.UUID, "GPU-"), g.UUID)
		uuids[g.UUID] = true
		require.Equal(t, "9.0", g.ComputeCapability)
		require.Equal(t, total, g.MemoryTotalBytes)
		// The mock leaves utilisation unimplemented: zero, not a failure.
		require.Zero(t, g.UtilizationPercent)
	}
	require.Len(t, uuids, 8, "UUIDs must be distinct")
	require.Equal(t, total-10*gib, inv.GPUs[0].MemoryFreeBytes)
	require.Equal(t, total, inv.GPUs[1].MemoryFreeBytes)
	require.Equal(t, total-40*gib, inv.GPUs[3].MemoryFreeBytes)
	require.Equal(t, "node n1 · 8× NVIDIA H100 80GB HBM3", inv.Summary("n1"))
}

func TestSnapshotIsFresh(t *testing.T) {
	srv := h100(t)
	c, err := New(Options{NVML: srv, ModelDir: t.TempDir(), Logger: quietLogger()})
	require.NoError(t, err)
	t.Cleanup(c.Shutdown)

	total := uint64(81920) << 20
	s := c.Snapshot()
	require.Len(t, s.GPUs, 8)
	require.Equal(t, 8*total, s.FreeVRAMBytes())
	require.Positive(t, s.DiskFreeBytes)
	require.Nil(t, s.Pools)
	require.False(t, s.At.IsZero())

	setUsed(srv, 2, 30*gib)
	s2 := c.Snapshot()
	require.Equal(t, 2, s2.GPUs[2].Index)
	require.Equal(t, total, s2.GPUs[2].MemoryTotalBytes)
	require.Equal(t, total-30*gib, s2.GPUs[2].MemoryFreeBytes)
	require.Equal(t, 8*total-30*gib, s2.FreeVRAMBytes())
	require.False(t, s2.At.Before(s.At))
}

func TestPerGPUErrorDoesNotFailInventory(t *testing.T) {
	srv := h100(t)
	srv.Devices[5].(*server.Device).GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED
	}
	srv.Devices[1].(*server.Device).GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		return nvml.Utilization{Gpu: 42, Memory: 7}, nvml.SUCCESS
	}
	srv.Devices[6].(*server.Device).GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, err := New(Options{NVML: srv, ModelDir: t.TempDir(), Logger: log})
	require.NoError(t, err)
	t.Cleanup(c.Shutdown)

	inv := c.Inventory()
	require.Len(t, inv.GPUs, 8)
	require.Equal(t, uint32(42), inv.GPUs[1].UtilizationPercent)
	require.Zero(t, inv.GPUs[5].UtilizationPercent)
	require.Zero(t, inv.GPUs[6].MemoryTotalBytes)
	require.Equal(t, "NVIDIA H100 80GB HBM3", inv.GPUs[6].Name)
	require.Contains(t, logs.String(), "level=DEBUG")
	require.Contains(t, logs.String(), "ERROR_NOT_SUPPORTED")
	require.NotContains(t, logs.String(), "level=WARN")
}

func TestMockNames(t *testing.T) {
	for _, name := range []string{"dgxa100", "dgxh100", "dgxh200"} {
		lib, err := Mock(name)
		require.NoError(t, err, name)
		n, ret := lib.DeviceGetCount()
		require.Equal(t, nvml.SUCCESS, ret)
		require.Equal(t, 8, n)
	}
	_, err := Mock("nope")
	require.Error(t, err)
	for _, name := range []string{"nope", "dgxa100", "dgxh100", "dgxh200"} {
		require.Contains(t, err.Error(), name)
	}

	a, _ := Mock("dgxh100")
	b, _ := Mock("dgxh100")
	require.NotSame(t, a, b, "each call must return a fresh server")
}

func requireCPUOnly(t *testing.T, c *Collector, dir string, reason string) {
	t.Helper()
	require.True(t, c.CPUOnly())
	inv := c.Inventory()
	require.True(t, inv.CPUOnly)
	require.Contains(t, inv.NVMLError, reason)
	require.Empty(t, inv.GPUs)
	require.NotNil(t, inv.GPUs, "GPUs marshals as [] not null")
	require.Empty(t, inv.DriverVersion)
	require.Positive(t, inv.CPUCores)
	require.Positive(t, inv.MemoryTotalBytes)
	require.Positive(t, inv.DiskFreeBytes)
	require.Equal(t, dir, inv.ModelDir)
	require.NotEmpty(t, inv.MachineID)
	require.Equal(t, "node x · CPU only", inv.Summary("x"))

	s := c.Snapshot()
	require.Empty(t, s.GPUs)
	require.Positive(t, s.DiskFreeBytes)
	c.Shutdown()
	c.Shutdown()
}

func TestCPUOnlyWithoutLibrary(t *testing.T) {
	var shutdowns int
	lib := &mock.Interface{
		InitFunc:     func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND },
		ShutdownFunc: func() nvml.Return { shutdowns++; return nvml.SUCCESS },
	}
	var logs bytes.Buffer
	dir := t.TempDir() + "/models/nested" // created by New
	c, err := New(Options{NVML: lib, ModelDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, err)
	requireCPUOnly(t, c, dir, "ERROR_LIBRARY_NOT_FOUND")
	require.Zero(t, shutdowns, "Shutdown must not be called when Init failed")
	require.Equal(t, 1, strings.Count(logs.String(), "\n"), "exactly one log line: %s", logs.String())
	require.Contains(t, logs.String(), "level=WARN")
	require.Contains(t, logs.String(), "CPU-only")
	require.Contains(t, logs.String(), "ERROR_LIBRARY_NOT_FOUND")
}

func TestCPUOnlyWhenInitPanics(t *testing.T) {
	lib := &mock.Interface{InitFunc: func() nvml.Return { panic("dlopen failed") }}
	dir := t.TempDir()
	c, err := New(Options{NVML: lib, ModelDir: dir, Logger: quietLogger()})
	require.NoError(t, err)
	requireCPUOnly(t, c, dir, "dlopen failed")
}

func TestCPUOnlyWithNoGPUs(t *testing.T) {
	var shutdowns int
	lib := &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { return 0, nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { shutdowns++; return nvml.SUCCESS },
	}
	dir := t.TempDir()
	c, err := New(Options{NVML: lib, ModelDir: dir, Logger: quietLogger()})
	require.NoError(t, err)
	require.Equal(t, 1, shutdowns, "NVML is released when it has nothing to offer")
	requireCPUOnly(t, c, dir, "no GPUs")
	require.Equal(t, 1, shutdowns)
}

func TestRealNVMLWithoutDriver(t *testing.T) {
	if _, err := os.Stat("/dev/nvidia0"); err == nil {
		t.Skip("an NVIDIA device is present; this test covers hosts without a driver")
	}
	dir := t.TempDir()
	c, err := New(Options{ModelDir: dir, Logger: quietLogger()})
	require.NoError(t, err)
	reason := c.Inventory().NVMLError
	t.Logf("NVMLError: %s", reason)
	require.NotEmpty(t, reason)
	requireCPUOnly(t, c, dir, reason)
}

func TestDefaultMachineID(t *testing.T) {
	c, err := New(Options{NVML: &mock.Interface{InitFunc: func() nvml.Return { return nvml.ERROR_DRIVER_NOT_LOADED }}, Logger: quietLogger()})
	require.NoError(t, err)
	want := ""
	if b, err := os.ReadFile("/etc/machine-id"); err == nil {
		want = strings.TrimSpace(string(b))
	}
	if want == "" {
		want, _ = os.Hostname()
	}
	require.Equal(t, want, c.Inventory().MachineID)
	require.Zero(t, c.Inventory().DiskFreeBytes, "no ModelDir, no disk figure")
}

func TestShutdownAndConcurrentUse(t *testing.T) {
	srv := h100(t)
	var shutdowns int
	srv.ShutdownFunc = func() nvml.Return { shutdowns++; return nvml.SUCCESS }
	c, err := New(Options{NVML: srv, ModelDir: t.TempDir(), Logger: quietLogger()})
	require.NoError(t, err)

	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				c.Snapshot()
				c.Inventory()
			}
		}()
	}
	wg.Wait()

	c.Shutdown()
	c.Shutdown()
	require.Equal(t, 1, shutdowns)
	require.Empty(t, c.Snapshot().GPUs)
	require.Empty(t, c.Inventory().GPUs)
}

func TestProcessMemory(t *testing.T) {
	srv := h100(t)
	for i, used := range []uint64{3 * gib, 0, 5 * gib} {
		dev := srv.Devices[i].(*server.Device)
		procs := []nvml.ProcessInfo{{Pid: 4242, UsedGpuMemory: used}, {Pid: 7, UsedGpuMemory: gib}}
		dev.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) { return procs, nvml.SUCCESS }
	}
	c, err := New(Options{NVML: srv, ModelDir: t.TempDir(), Logger: quietLogger()})
	require.NoError(t, err)
	t.Cleanup(c.Shutdown)
	require.Equal(t, 8*gib, c.ProcessGPUMemory(4242), "summed over GPUs; GPUs without the figure are skipped")
	require.Zero(t, c.ProcessGPUMemory(999))

	rss, err := ProcessRSS(os.Getpid())
	require.NoError(t, err)
	require.Greater(t, rss, uint64(1<<20), "this test binary holds more than 1 MiB")
	_, err = ProcessRSS(1 << 30)
	require.Error(t, err)
}
