package config

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"
)

const envAnnotation = "llorch_env"

// Env registers env as the fallback of an already defined flag and notes it
// in the flag's usage so --help shows it.
func Env(fs *pflag.FlagSet, flag, env string) {
	f := fs.Lookup(flag)
	if f == nil {
		panic("config: no flag " + flag)
	}
	_ = fs.SetAnnotation(flag, envAnnotation, []string{env})
	f.Usage += " (env " + env + ")"
}

// EnvVar is the env var Apply reads for f, "" when it has none.
func EnvVar(f *pflag.Flag) string {
	if envs := f.Annotations[envAnnotation]; len(envs) > 0 {
		return envs[0]
	}
	return ""
}

// Apply fills every flag the command line left unset from its env var, then
// from the dev state file (home/dev.env), so `llorch worker` with no flags joins
// a `llorch dev` cluster on the same machine.
func Apply(fs *pflag.FlagSet, home string) error {
	devEnv, err := ReadDevEnv(home)
	if err != nil {
		return err
	}
	var firstErr error
	fs.VisitAll(func(f *pflag.Flag) {
		env := EnvVar(f)
		if f.Changed || env == "" || firstErr != nil {
			return
		}
		v, ok := os.LookupEnv(env)
		if !ok {
			v, ok = devEnv[env]
		}
		if !ok {
			return
		}
		if err := f.Value.Set(v); err != nil {
			firstErr = fmt.Errorf("env %s=%q for --%s: %w", env, v, f.Name, err)
		}
	})
	return firstErr
}

// DevEnvFile is where `llorch dev` writes the addresses and secrets of the
// cluster it runs, so other commands on the machine can join it.
func DevEnvFile(home string) string { return filepath.Join(home, "dev.env") }

// ReadDevEnv reads KEY=VALUE lines; a missing file is an empty map.
func ReadDevEnv(home string) (map[string]string, error) {
	out := map[string]string{}
	if home == "" {
		return out, nil
	}
	f, err := os.Open(DevEnvFile(home))
	if os.IsNotExist(err) {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if ok {
			out[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return out, sc.Err()
}

// WriteDevEnv writes the dev state file readable by the owner only: it holds
// the API token and S3 secret.
func WriteDevEnv(home string, kv [][2]string) error {
	var b strings.Builder
	b.WriteString("# written by `llorch dev`; read by llorch commands run with the same LLORCH_HOME\n")
	for _, p := range kv {
		fmt.Fprintf(&b, "%s=%s\n", p[0], p[1])
	}
	tmp := DevEnvFile(home) + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, DevEnvFile(home))
}

// Home is the state dir: LLORCH_HOME or .llorch in the working directory.
func Home() string {
	if h := os.Getenv("LLORCH_HOME"); h != "" {
		return h
	}
	return ".llorch"
}
