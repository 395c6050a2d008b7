package config

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/pflag"
)

// A secret setting (a token, a key) is never a flag: a command line is
// readable by every local user in ps and /proc/<pid>/cmdline, and by anyone
// who reaches pprof's /debug/pprof/cmdline. It comes from the env var
// LLORCH_X, or from the file LLORCH_X_FILE names (a mounted Docker or
// Kubernetes secret), or from dev.env.

const (
	secretAnnotation = "llorch_secret"
	// FileSuffix turns a secret's env var into the one naming its file.
	FileSuffix = "_FILE"
)

// secretFlag is the hidden flag a secret would be: it takes a value
// without keeping it, so Apply refuses it without echoing the secret
// (pflag's own errors quote the value). It holds where Apply writes the
// secret from the environment.
type secretFlag struct {
	dst *string
	env string
}

func (*secretFlag) String() string   { return "" }
func (*secretFlag) Set(string) error { return nil }
func (*secretFlag) Type() string     { return "string" }

// AddSecret defines a secret setting, which Apply writes into dst: its env
// var is LLORCH_ and name upper-cased ("api-token": LLORCH_API_TOKEN), as
// BindEnv names a flag's. --name is a hidden flag that Apply refuses,
// naming the env var to use instead, so an old command line fails loudly
// instead of running without its secret.
func AddSecret(fs *pflag.FlagSet, dst *string, name, usage string) {
	env := envName(name)
	f := fs.VarPF(&secretFlag{dst: dst, env: env}, name, "", usage)
	f.Hidden = true
	_ = fs.SetAnnotation(name, secretAnnotation, []string{env})
}

// Secret describes one secret setting of a command.
type Secret struct{ Name, Env, Usage string }

// Secrets are the secret settings defined on fs, sorted by env var.
func Secrets(fs *pflag.FlagSet) []Secret {
	var out []Secret
	fs.VisitAll(func(f *pflag.Flag) {
		if env := SecretEnv(f); env != "" {
			out = append(out, Secret{Name: f.Name, Env: env, Usage: f.Usage})
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Env < out[j].Env })
	return out
}

// SecretEnv is the env var of f when f is a secret's refused flag, else "".
func SecretEnv(f *pflag.Flag) string {
	if envs := f.Annotations[secretAnnotation]; len(envs) > 0 {
		return envs[0]
	}
	return ""
}

// SecretFlagError is a secret given on the command line.
func SecretFlagError(flag, env string) error {
	return fmt.Errorf("--%s: secrets are not taken from the command line (every local user reads it in ps and /proc): set %s, or %s%s to a file holding it",
		flag, env, env, FileSuffix)
}

// applySecrets refuses secret flags and fills each secret of fs from the
// environment, else from dev.env.
func applySecrets(fs *pflag.FlagSet, devEnv map[string]string, home string) error {
	var firstErr error
	fs.VisitAll(func(f *pflag.Flag) {
		sf, ok := f.Value.(*secretFlag)
		if !ok || firstErr != nil {
			return
		}
		if f.Changed {
			firstErr = SecretFlagError(f.Name, sf.env)
			return
		}
		v, ok, err := lookupSecret(sf.env, os.LookupEnv, "the environment")
		if err == nil && !ok {
			v, ok, err = lookupSecret(sf.env, func(k string) (string, bool) { v, ok := devEnv[k]; return v, ok }, DevEnvFile(home))
		}
		if err != nil {
			firstErr = err
		} else if ok {
			*sf.dst = v
		}
	})
	return firstErr
}

// ReadSecret is secret env's value from the environment: LLORCH_X, or the
// content of the file LLORCH_X_FILE names; "" when neither is set.
func ReadSecret(env string) (string, error) {
	v, _, err := lookupSecret(env, os.LookupEnv, "the environment")
	return v, err
}

// lookupSecret reads env or the file env_FILE names from one source
// (where, for errors). Empty values count as unset: compose writes
// `LLORCH_X: ${LLORCH_X:-}` for a secret given as a file instead.
func lookupSecret(env string, get func(string) (string, bool), where string) (string, bool, error) {
	v, _ := get(env)
	file, _ := get(env + FileSuffix)
	switch {
	case v != "" && file != "":
		return "", false, fmt.Errorf("both %s and %s%s are set in %s: set one", env, env, FileSuffix, where)
	case v != "":
		return v, true, nil
	case file == "":
		return "", false, nil
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		return "", false, fmt.Errorf("%s%s: cannot read the secret: %w", env, FileSuffix, err)
	}
	// Editors and `echo` end the file with a newline; it is no part of a token.
	s := strings.TrimRight(string(raw), "\r\n")
	if s == "" {
		return "", false, fmt.Errorf("%s%s: %s is empty", env, FileSuffix, file)
	}
	return s, true, nil
}
