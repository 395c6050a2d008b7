package main

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/llorch/llorch/config"
)

// homeFromEnv is LLORCH_HOME while the commands are built: a flag whose
// default is this value takes LLORCH_HOME through its default.
const homeFromEnv = "/llorch-home-from-env"

// flagEnvTable is every flag of every command with the env var that sets it:
// "command --flag ENV" lines, sorted; ENV is empty for a flag without one.
// A secret, which no flag sets, is a "command secret ENV" line.
func flagEnvTable(t *testing.T) []string {
	t.Setenv("LLORCH_HOME", homeFromEnv)
	var rows []string
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.LocalNonPersistentFlags().VisitAll(func(f *pflag.Flag) {
			if env := config.SecretEnv(f); env != "" {
				rows = append(rows, strings.TrimPrefix(c.CommandPath(), "llorch ")+" secret "+env)
				return
			}
			env := config.EnvVar(f)
			if env == "" && f.DefValue == homeFromEnv {
				env = "LLORCH_HOME (default)"
			}
			row := fmt.Sprintf("%s --%s %s", strings.TrimPrefix(c.CommandPath(), "llorch "), f.Name, env)
			rows = append(rows, strings.TrimSpace(row))
		})
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(rootCmd())
	sort.Strings(rows)
	return rows
}

// The env var of every flag is pinned: a change to one is deliberate, and
// shows in testdata/flag_env.txt.
func TestFlagEnvTable(t *testing.T) {
	want, err := os.ReadFile("testdata/flag_env.txt")
	require.NoError(t, err)
	require.Equal(t, string(want), strings.Join(flagEnvTable(t), "\n")+"\n")
}

// readmeSections names the commands each section of README.md's
// configuration table is about.
var readmeSections = map[string][]string{
	"all long-running commands":             {"apiserver", "worker", "sim nodes"},
	"S3 (apiserver, worker, `models push`)": {"apiserver", "worker", "models push"},
	"`llorch apiserver`":                    {"apiserver"},
	"`llorch worker`":                       {"worker"},
	"API clients (`llorch models`, `tasks`, `nodes`, `pools`)": {"models push", "models ls", "models rm",
		"tasks submit", "tasks ls", "tasks get", "tasks cancel", "nodes ls", "nodes get", "nodes drain", "nodes undrain",
		"pools ls", "pools create", "pools health", "pools drain", "pools reload"},
	"`llorch engine`":       {"engine"},
	"`llorch dev`":          {"dev"},
	"`llorch sim nodes`":    {"sim nodes"},
	"`llorch codec-server`": {"codec-server"},
}

// Every env var in README.md's configuration table is the one of its flag in
// a command of its section, and every env var a flag has is in the table.
func TestREADMEConfigurationTable(t *testing.T) {
	envOf := map[string]string{}       // "command --flag": env
	secretsOf := map[string][]string{} // command: its secrets' env vars
	for _, row := range flagEnvTable(t) {
		if cmd, env, ok := strings.Cut(row, " secret "); ok {
			secretsOf[cmd] = append(secretsOf[cmd], env)
			continue
		}
		cmdFlag, env, _ := strings.Cut(strings.TrimSuffix(row, " (default)"), " LLORCH_")
		if env != "" {
			env = "LLORCH_" + env
		}
		envOf[cmdFlag] = env
	}
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	_, table, ok := strings.Cut(string(readme), "\n## Configuration\n")
	require.True(t, ok, "README.md has a Configuration section")
	table, _, _ = strings.Cut(table, "\n## ")
	flagRE := regexp.MustCompile("`(--[a-z0-9-]+)`")
	envRE := regexp.MustCompile("`(LLORCH_[A-Z0-9_]+)`")
	documented := map[string]bool{}       // "--flag ENV"
	documentedSecret := map[string]bool{} // "command ENV"
	var section []string
	for _, line := range strings.Split(table, "\n") {
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if !strings.HasPrefix(line, "| ") || len(cells) < 2 || strings.HasPrefix(line, "| flag ") {
			continue
		}
		if title, ok := strings.CutPrefix(strings.TrimSpace(cells[0]), "**"); ok {
			title = strings.TrimSuffix(title, "**")
			section, ok = readmeSections[title]
			require.True(t, ok, "README section %q: add it to readmeSections", title)
			continue
		}
		if strings.TrimSpace(cells[0]) == "(secret)" {
			// A secret's row names its env var and the _FILE one; no flag.
			envs := envRE.FindAllStringSubmatch(cells[1], -1)
			require.Len(t, envs, 2, "README.md secret row %q: want `LLORCH_X`, `LLORCH_X_FILE`", line)
			env := envs[0][1]
			require.Equal(t, env+config.FileSuffix, envs[1][1], line)
			found := false
			for _, cmd := range section {
				if slices.Contains(secretsOf[cmd], env) {
					documentedSecret[cmd+" "+env], found = true, true
				}
			}
			require.True(t, found, "README.md: secret %s in a section of %v, which have no such secret", env, section)
			continue
		}
		env := ""
		if m := envRE.FindStringSubmatch(cells[1]); m != nil {
			env = m[1]
		}
		for _, m := range flagRE.FindAllStringSubmatch(cells[0], -1) {
			flag := m[1]
			documented[flag+" "+env] = true
			var inCode []string
			matches := false
			for _, cmd := range section {
				if e, ok := envOf[cmd+" "+flag]; ok {
					inCode = append(inCode, fmt.Sprintf("%s: %q", cmd, e))
					matches = matches || e == env
				}
			}
			require.True(t, matches, "README.md: %s with env %q; the code of %v has %v", flag, env, section, inCode)
		}
	}
	for cmd, envs := range secretsOf {
		for _, env := range envs {
			require.True(t, documentedSecret[cmd+" "+env], "secret %s of %s is not in README.md's configuration table", env, cmd)
		}
	}
	for cmdFlag, env := range envOf {
		_, flag, _ := strings.Cut(cmdFlag, " --")
		if env != "" {
			require.True(t, documented["--"+flag+" "+env], "%s (env %s) is not in README.md's configuration table", cmdFlag, env)
		}
	}
}
