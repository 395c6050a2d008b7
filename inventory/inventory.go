package inventory

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/llorch/llorch/node"
)

// Options configures a Collector.
type Options struct {
	NVML      nvml.Interface // nil means nvml.New() (the real library, loaded with dlopen)
	ModelDir  string         // disk free is measured for this dir (created if missing)
	MachineID string         // empty means /etc/machine-id, else the hostname
	Address   string
	Version   string
	Logger    *slog.Logger // nil means slog.Default()
}

// Collector reads host facts. Safe for concurrent use.
type Collector struct {
	lib       nvml.Interface
	log       *slog.Logger
	modelDir  string
	machineID string
	address   string
	version   string

	// Set once in New, read-only afterwards.
	cpuOnly bool
	nvmlErr string

	// mu keeps Shutdown from pulling NVML out from under a running query;
	// queries only read, so they share the lock.
	mu     sync.RWMutex
	active bool // NVML initialised and not yet shut down
}

// New initialises NVML. Without a driver (nvml.Init returns an error, or
// panics because the library can't be loaded) the node is CPU-only: New
// still succeeds, logs one warning saying why, and Inventory reports CPUOnly
// with NVMLError set to the reason. New fails only when ModelDir can't be
// created.
func New(opts Options) (*Collector, error) {
	c := &Collector{
		lib:       opts.NVML,
		log:       opts.Logger,
		modelDir:  opts.ModelDir,
		machineID: opts.MachineID,
		address:   opts.Address,
		version:   opts.Version,
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.lib == nil {
		c.lib = nvml.New()
	}
	if c.modelDir != "" {
		if err := os.MkdirAll(c.modelDir, 0o755); err != nil {
			return nil, fmt.Errorf("inventory: model dir: %w", err)
		}
	}
	if c.machineID == "" {
		c.machineID = defaultMachineID()
	}

	if err := c.start(); err != nil {
		c.cpuOnly = true
		c.nvmlErr = err.Error()
		c.log.Warn("NVML unavailable, node runs CPU-only", "reason", c.nvmlErr)
	} else {
		c.active = true
	}
	return c, nil
}

// start initialises NVML and checks there is at least one GPU to use.
func (c *Collector) start() (err error) {
	// The real binding panics rather than returning an error in some
	// load failures, and a go-nvml mock panics on methods it leaves unset.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("NVML init panicked: %v", r)
		}
	}()
	if ret := c.lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
			return fmt.Errorf("nvml init: %v (NVIDIA driver library libnvidia-ml not found)", ret)
		}
		return fmt.Errorf("nvml init: %v", ret)
	}
	n, ret := c.lib.DeviceGetCount()
	switch {
	case ret != nvml.SUCCESS:
		err = fmt.Errorf("nvml device count: %v", ret)
	case n == 0:
		err = errors.New("NVML found no GPUs")
	default:
		return nil
	}
	// Balance Init: NVML is refcounted and we will never use it.
	c.lib.Shutdown()
	return err
}

// CPUOnly reports whether the node has no usable GPU (decided in New).
func (c *Collector) CPUOnly() bool { return c.cpuOnly }

// Shutdown releases NVML. It is idempotent; afterwards GPU figures are empty.
func (c *Collector) Shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.active {
		return
	}
	c.active = false
	func() {
		defer func() {
			if r := recover(); r != nil {
				c.log.Warn("nvml shutdown panicked", "panic", r)
			}
		}()
		if ret := c.lib.Shutdown(); ret != nvml.SUCCESS {
			c.log.Warn("nvml shutdown failed", "error", ret.Error())
		}
	}()
}

// Inventory collects everything the node reports when it registers.
func (c *Collector) Inventory() node.Inventory {
	inv := node.Inventory{
		MachineID: c.machineID,
		Address:   c.address,
		GPUs:      []node.GPU{},
		CPUOnly:   c.cpuOnly,
		NVMLError: c.nvmlErr,
		CPUCores:  runtime.NumCPU(),
		ModelDir:  c.modelDir,
		Version:   c.version,
	}
	if h, err := os.Hostname(); err == nil {
		inv.Hostname = h
	}
	if total, err := MemInfo("MemTotal"); err != nil {
		c.log.Debug("inventory: reading RAM total", "error", err)
	} else {
		inv.MemoryTotalBytes = total
	}
	inv.DiskFreeBytes = c.diskFree()

	c.mu.RLock()
	if c.active {
		if v, ok := query(c, -1, "driver version", c.lib.SystemGetDriverVersion); ok {
			inv.DriverVersion = v
		}
		c.eachDevice(func(i int, d nvml.Device) {
			g := node.GPU{Index: i}
			if v, ok := query(c, i, "uuid", d.GetUUID); ok {
				g.UUID = v
			}
			if v, ok := query(c, i, "name", d.GetName); ok {
				g.Name = v
			}
			g.MemoryTotalBytes, g.MemoryFreeBytes = c.memory(i, d)
			g.UtilizationPercent = c.utilization(i, d)
			type cc struct{ major, minor int }
			if v, ok := query(c, i, "compute capability", func() (cc, nvml.Return) {
				major, minor, ret := d.GetCudaComputeCapability()
				return cc{major, minor}, ret
			}); ok {
				g.ComputeCapability = strconv.Itoa(v.major) + "." + strconv.Itoa(v.minor)
			}
			inv.GPUs = append(inv.GPUs, g)
		})
	}
	c.mu.RUnlock()

	inv.CollectedAt = time.Now().UTC()
	return inv
}

// Snapshot collects the figures that change between heartbeats. It skips
// identity and static facts so it stays cheap. Pools are left nil for the
// caller to fill.
func (c *Collector) Snapshot() node.Snapshot {
	s := node.Snapshot{GPUs: []node.GPUUsage{}, DiskFreeBytes: c.diskFree()}
	c.mu.RLock()
	if c.active {
		c.eachDevice(func(i int, d nvml.Device) {
			u := node.GPUUsage{Index: i}
			u.MemoryTotalBytes, u.MemoryFreeBytes = c.memory(i, d)
			u.UtilizationPercent = c.utilization(i, d)
			s.GPUs = append(s.GPUs, u)
		})
	}
	c.mu.RUnlock()
	s.At = time.Now().UTC()
	return s
}

// eachDevice calls fn for every GPU NVML can hand out. The count is asked
// each time because a GPU can fall off the bus; a device whose handle fails
// is skipped rather than reported with empty figures.
func (c *Collector) eachDevice(fn func(i int, d nvml.Device)) {
	n, ok := query(c, -1, "device count", c.lib.DeviceGetCount)
	if !ok {
		return
	}
	for i := 0; i < n; i++ {
		d, ok := query(c, i, "handle", func() (nvml.Device, nvml.Return) {
			return c.lib.DeviceGetHandleByIndex(i)
		})
		if !ok || d == nil {
			c.log.Warn("inventory: skipping GPU without a handle", "gpu", i)
			continue
		}
		fn(i, d)
	}
}

func (c *Collector) memory(i int, d nvml.Device) (total, free uint64) {
	m, ok := query(c, i, "memory info", d.GetMemoryInfo)
	if !ok {
		return 0, 0
	}
	free = m.Free
	// go-nvml's mock servers only track Total and Used and leave Free at 0.
	// Real NVML keeps Total = Free + Used, so deriving Free from Used when it
	// is zero changes nothing there and makes the mocks shapeable.
	if free == 0 && m.Used < m.Total {
		free = m.Total - m.Used
	}
	return m.Total, free
}

func (c *Collector) utilization(i int, d nvml.Device) uint32 {
	u, ok := query(c, i, "utilization", d.GetUtilizationRates)
	if !ok {
		return 0
	}
	return u.Gpu
}

// query runs one NVML call and reports whether it produced a value. Failures
// (ERROR_NOT_SUPPORTED is common, e.g. utilisation on some boards and in
// the mocks, where the unset method panics) leave that one field zero
// instead of failing the inventory, so they are only logged at debug.
func query[T any](c *Collector, gpu int, field string, f func() (T, nvml.Return)) (v T, ok bool) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Debug("inventory: NVML call panicked", "gpu", gpu, "field", field, "panic", r)
			var zero T
			v, ok = zero, false
		}
	}()
	v, ret := f()
	if ret != nvml.SUCCESS {
		c.log.Debug("inventory: NVML call failed", "gpu", gpu, "field", field, "error", ret.Error())
		var zero T
		return zero, false
	}
	return v, true
}

func (c *Collector) diskFree() uint64 {
	if c.modelDir == "" {
		return 0
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(c.modelDir, &st); err != nil {
		c.log.Debug("inventory: statfs model dir", "dir", c.modelDir, "error", err)
		return 0
	}
	// Bavail, not Bfree: blocks reserved for root are not ours to fill.
	return uint64(st.Bavail) * uint64(st.Bsize)
}

// MemInfo reads one field of /proc/meminfo (e.g. "MemTotal",
// "MemAvailable") in bytes.
func MemInfo(field string) (uint64, error) {
	return procStatusField("/proc/meminfo", field)
}

// procStatusField reads one "Name:   123 kB" line of a /proc file in bytes.
func procStatusField(path, field string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "MemTotal:       16318412 kB"
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != field+":" {
			continue
		}
		n, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", field, err)
		}
		if len(fields) > 2 && fields[2] == "kB" {
			n *= 1024
		}
		return n, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s not found in %s", field, path)
}

// defaultMachineID prefers /etc/machine-id because it survives hostname
// changes; the hostname is the fallback on systems without systemd.
func defaultMachineID() string {
	if b, err := os.ReadFile("/etc/machine-id"); err == nil {
		if id := string(bytes.TrimSpace(b)); id != "" {
			return id
		}
	}
	h, _ := os.Hostname()
	return h
}

// ProcessGPUMemory is the GPU memory a process holds, summed over every GPU
// (NVML's compute processes). It is 0 on CPU-only nodes and where the driver
// does not report per-process figures.
func (c *Collector) ProcessGPUMemory(pid int) uint64 {
	var used uint64
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.active {
		return 0
	}
	c.eachDevice(func(i int, d nvml.Device) {
		procs, ok := query(c, i, "compute processes", d.GetComputeRunningProcesses)
		if !ok {
			return
		}
		for _, p := range procs {
			if int(p.Pid) == pid {
				used += p.UsedGpuMemory
			}
		}
	})
	return used
}

// ProcessRSS is a process's resident memory in bytes, from /proc.
func ProcessRSS(pid int) (uint64, error) {
	return procStatusField(fmt.Sprintf("/proc/%d/status", pid), "VmRSS")
}
