// Command vulncheck runs govulncheck over the module against a vulnerability
// database built from a pinned golang.org/x/vulndb (the module proxy serves
// it; vuln.go.dev may be out of reach), and fails on every finding the code
// reaches, except those fixed only by a newer Go toolchain, which it lists
// (docs/security.md, "Dependencies"). `just vulncheck`; part of `just test`.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// vulndb is the pinned database: bump it to learn of newer advisories.
const vulndb = "golang.org/x/vulndb@v0.0.0-20261105234957-e22db6528018"

func main() {
	bin := flag.String("govulncheck", "bin/govulncheck", "the govulncheck binary (just tools installs it)")
	out := flag.String("db", "bin/vulndb", "where the database is built")
	flag.Parse()
	if err := run(*bin, *out); err != nil {
		fmt.Fprintln(os.Stderr, "vulncheck:", err)
		os.Exit(1)
	}
}

func run(bin, out string) error {
	src, err := moduleDir(vulndb)
	if err != nil {
		return err
	}
	n, err := buildDB(filepath.Join(src, "data", "osv"), out)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	fmt.Printf("vulncheck: %d advisories from %s\n", n, vulndb)
	cmd := exec.Command(bin, "-db", "file://"+abs, "-format", "json", "./...")
	cmd.Stderr = os.Stderr
	raw, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%s: %w", bin, err)
	}
	called, toolchain, err := findings(raw)
	if err != nil {
		return err
	}
	for _, f := range toolchain {
		fmt.Println("vulncheck: waived until the Go toolchain moves:", f)
	}
	if len(called) > 0 {
		return fmt.Errorf("the code reaches %d vulnerable dependencies:\n  %s", len(called), strings.Join(called, "\n  "))
	}
	fmt.Println("vulncheck: no dependency the code reaches has a known vulnerability")
	return nil
}

// moduleDir downloads a module through the proxy and returns its directory.
func moduleDir(mod string) (string, error) {
	var info struct{ Dir, Error string }
	raw, err := exec.Command("go", "mod", "download", "-json", mod).Output()
	if jerr := json.Unmarshal(raw, &info); jerr != nil || info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: %v %s %s", mod, err, info.Error, jerr)
	}
	return info.Dir, nil
}

// buildDB writes the layout govulncheck reads with -db file://: each OSV
// entry under ID/, and the index of modules to entries.
func buildDB(osvDir, out string) (int, error) {
	files, err := filepath.Glob(filepath.Join(osvDir, "*.json"))
	if err != nil || len(files) == 0 {
		return 0, fmt.Errorf("no OSV entries in %s: %v", osvDir, err)
	}
	for _, d := range []string{"ID", "index"} {
		if err := os.MkdirAll(filepath.Join(out, d), 0o755); err != nil {
			return 0, err
		}
	}
	type vuln struct {
		ID       string `json:"id"`
		Modified string `json:"modified,omitempty"`
	}
	mods := map[string][]vuln{}
	latest := ""
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			return 0, err
		}
		var e struct {
			ID       string `json:"id"`
			Modified string `json:"modified"`
			Affected []struct {
				Package struct{ Name string } `json:"package"`
			} `json:"affected"`
		}
		if err := json.Unmarshal(raw, &e); err != nil {
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		if err := os.WriteFile(filepath.Join(out, "ID", e.ID+".json"), raw, 0o644); err != nil {
			return 0, err
		}
		latest = max(latest, e.Modified)
		seen := map[string]bool{}
		for _, a := range e.Affected {
			if p := a.Package.Name; !seen[p] {
				seen[p] = true
				mods[p] = append(mods[p], vuln{ID: e.ID, Modified: e.Modified})
			}
		}
	}
	type module struct {
		Path  string `json:"path"`
		Vulns []vuln `json:"vulns"`
	}
	index := make([]module, 0, len(mods))
	for p, vs := range mods {
		sort.Slice(vs, func(i, j int) bool { return vs[i].ID < vs[j].ID })
		index = append(index, module{Path: p, Vulns: vs})
	}
	sort.Slice(index, func(i, j int) bool { return index[i].Path < index[j].Path })
	if latest == "" {
		latest = "1970-01-01T00:00:00Z"
	}
	for name, v := range map[string]any{"db.json": map[string]string{"modified": latest}, "modules.json": index} {
		b, err := json.Marshal(v)
		if err != nil {
			return 0, err
		}
		if err := os.WriteFile(filepath.Join(out, "index", name), b, 0o644); err != nil {
			return 0, err
		}
	}
	return len(files), nil
}

// findings reads govulncheck's JSON stream: the findings the code reaches
// (a trace down to a function), split into those of the standard library
// (a newer toolchain fixes them) and the rest.
func findings(raw []byte) (called, toolchain []string, err error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	seen := map[string]bool{}
	for {
		var msg struct {
			Finding *struct {
				OSV          string `json:"osv"`
				FixedVersion string `json:"fixed_version"`
				Trace        []struct {
					Module, Version, Package, Function string
				} `json:"trace"`
			} `json:"finding"`
		}
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, nil, fmt.Errorf("govulncheck's output: %w", err)
		}
		f := msg.Finding
		if f == nil || len(f.Trace) == 0 || f.Trace[0].Function == "" {
			continue // not reached by the code (module or package level)
		}
		t := f.Trace[0]
		line := fmt.Sprintf("%s in %s@%s (%s.%s), fixed in %s", f.OSV, t.Module, t.Version, t.Package, t.Function, f.FixedVersion)
		key := f.OSV + t.Module
		if seen[key] {
			continue
		}
		seen[key] = true
		if t.Module == "stdlib" {
			toolchain = append(toolchain, line)
		} else {
			called = append(called, line)
		}
	}
	return called, toolchain, nil
}
