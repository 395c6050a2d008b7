package inventory

import (
	"fmt"
	"sort"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
)

var mocks = map[string]func() nvml.Interface{
	"dgxa100": func() nvml.Interface { return dgxa100.New() },
	"dgxh100": func() nvml.Interface { return dgxh100.New() },
	"dgxh200": func() nvml.Interface { return dgxh200.New() },
}

// MockNames lists the names Mock accepts, sorted.
func MockNames() []string {
	names := make([]string, 0, len(mocks))
	for n := range mocks {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Mock returns a fresh go-nvml simulated server by name (8 GPUs each), for
// tests and for the worker's --nvml-mock demo flag. The concrete type is
// *server.Server from go-nvml's mock/server package, whose Devices can be
// type-asserted to *server.Device to shape memory use.
func Mock(name string) (nvml.Interface, error) {
	mk, ok := mocks[name]
	if !ok {
		return nil, fmt.Errorf("unknown NVML mock %q (valid: %s)", name, strings.Join(MockNames(), ", "))
	}
	return mk(), nil
}
