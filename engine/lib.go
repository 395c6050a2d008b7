package engine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// LibDirEnv names the directory holding libllama.so, libggml*.so and the
// ggml CPU variants; `just tools` fills ./bin/llama.
const LibDirEnv = "LLORCH_LLAMA_LIB_DIR"

// ErrNoLibrary says libllama is not where we looked; the message tells a
// person how to install it.
var ErrNoLibrary = errors.New("libllama not found: run `just tools` (installs ./bin/llama) or set --lib-dir / " + LibDirEnv)

// LibDir picks the libllama directory: the explicit value, else $LLORCH_LLAMA_LIB_DIR,
// else ./bin/llama, else bin/llama in a parent directory (tests run inside
// package folders of the repository). It returns ErrNoLibrary when none holds
// libllama.so.
func LibDir(explicit string) (string, error) {
	if explicit == "" {
		explicit = os.Getenv(LibDirEnv)
	}
	if explicit != "" {
		if !hasLib(explicit) {
			return "", fmt.Errorf("%w (no libllama.so in %s)", ErrNoLibrary, explicit)
		}
		return explicit, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		cand := filepath.Join(dir, "bin", "llama")
		if hasLib(cand) {
			return cand, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", ErrNoLibrary
		}
		dir = parent
	}
}

func hasLib(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "libllama.so"))
	return err == nil
}

var (
	libOnce sync.Once
	libDir  string
	libErr  error
)

// loadLibrary loads libllama once per process: its symbols and backends are
// process-global, so a second directory cannot be loaded beside the first.
func loadLibrary(dir string) error {
	libOnce.Do(func() {
		libDir = dir
		if libErr = llama.Load(dir); libErr != nil {
			libErr = fmt.Errorf("loading libllama from %s: %w", dir, libErr)
			return
		}
		// llama.cpp logs every tensor at load; our own log says what matters.
		llama.LogSet(llama.LogSilent())
		llama.Init()
	})
	if libErr == nil && dir != libDir {
		return fmt.Errorf("libllama already loaded from %s, cannot load %s too", libDir, dir)
	}
	return libErr
}
