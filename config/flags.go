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

// BindEnv gives every flag on fs the env var Apply reads for it: LLORCH_ and
// the flag's name upper-cased, '-' as '_' (--gc-budget: LLORCH_GC_BUDGET),
// so a knob has one name. renamed maps the flags whose env var is named
// otherwise; without lists the flags that have none. --home is left out: its
// default reads LLORCH_HOME (see AddHomeFlag). Call it once all flags are
// defined; it notes each env var in its flag's usage, for --help.
func BindEnv(fs *pflag.FlagSet, renamed map[string]string, without ...string) {
	skip := map[string]bool{homeFlag: true}
	for _, name := range without {
		skip[mustLookup(fs, name).Name] = true
	}
	for name := range renamed {
		mustLookup(fs, name)
	}
	fs.VisitAll(func(f *pflag.Flag) {
		if skip[f.Name] || SecretEnv(f) != "" {
			return // a secret's flag is refused, its env var read by Apply
		}
		env, ok := renamed[f.Name]
		if !ok {
			env = envName(f.Name)
		}
		_ = fs.SetAnnotation(f.Name, envAnnotation, []string{env})
		f.Usage += " (env " + env + ")"
	})
}

// envName is the env var of the setting named name (gc-budget:
// LLORCH_GC_BUDGET).
func envName(name string) string {
	return "LLORCH_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

func mustLookup(fs *pflag.FlagSet, name string) *pflag.Flag {
	f := fs.Lookup(name)
	if f == nil {
		panic("config: no flag " + name)
	}
	return f
}

const (
	homeFlag = "home"
	homeEnv  = "LLORCH_HOME"
)

// AddHomeFlag defines --home, the state dir whose dev.env Apply reads. Its
// default reads LLORCH_HOME (Home): Apply cannot, as it needs the dir
// before it reads dev.env.
func AddHomeFlag(fs *pflag.FlagSet, home *string, usage string) {
	fs.StringVar(home, homeFlag, Home(), usage+" (env "+homeEnv+")")
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
// a `llorch dev` cluster on the same machine. It fills the secrets
// (AddSecret) the same way, and refuses a secret given as a flag.
func Apply(fs *pflag.FlagSet, home string) error {
	devEnv, err := ReadDevEnv(home)
	if err != nil {
		return err
	}
	if err := applySecrets(fs, devEnv, home); err != nil {
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
	if h := os.Getenv(homeEnv); h != "" {
		return h
	}
	return ".llorch"
}
