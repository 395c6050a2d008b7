package dashboards

import (
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// metricRef finds metric names in PromQL. Upper case is matched too, so a
// misspelt name is reported rather than skipped.
var metricRef = regexp.MustCompile(`\bllorch_[A-Za-z0-9_]+`)

// histogramSuffixes are the series a histogram or summary exports besides its name.
var histogramSuffixes = []string{"_bucket", "_sum", "_count"}

// ref is one metric name used by a dashboard or a rule, and where.
type ref struct {
	file, where, metric string
}

// codeMetrics returns every llorch_* metric the module's non-test Go code
// defines, with the place it is defined: the Name of a composite literal
// (prometheus.CounterOpts and friends, Namespace and Subsystem joined as
// prometheus.BuildFQName does) and the first argument of prometheus.NewDesc.
func codeMetrics(t *testing.T, root, skip string) map[string]string {
	t.Helper()
	found := map[string]string{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (path == skip || strings.HasPrefix(name, ".") || name == "testdata" ||
				name == "vendor" || name == "node_modules" || name == "bin" || name == "dist") {
				return filepath.SkipDir
			}
			if path != root {
				if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
					return filepath.SkipDir // another module
				}
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if f == nil {
			return fmt.Errorf("read %s: %w", rel, err)
		}
		if err != nil {
			// The build reports it; scan what parsed.
			t.Logf("%s does not parse (%v): metrics defined past the error are missed", rel, err)
		}
		record := func(name string, pos token.Pos) {
			if strings.HasPrefix(name, "llorch_") {
				found[name] = fmt.Sprintf("%s:%d", rel, fset.Position(pos).Line)
			}
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CompositeLit:
				parts := map[string]string{}
				var namePos token.Pos
				for _, e := range n.Elts {
					kv, ok := e.(*ast.KeyValueExpr)
					if !ok {
						continue
					}
					key, ok := kv.Key.(*ast.Ident)
					if !ok || (key.Name != "Namespace" && key.Name != "Subsystem" && key.Name != "Name") {
						continue
					}
					if s, ok := stringLit(kv.Value); ok {
						parts[key.Name] = s
						if key.Name == "Name" {
							namePos = kv.Pos()
						}
					}
				}
				if parts["Name"] != "" {
					record(fqName(parts["Namespace"], parts["Subsystem"], parts["Name"]), namePos)
				}
			case *ast.CallExpr:
				sel, ok := n.Fun.(*ast.SelectorExpr)
				if !ok || sel.Sel.Name != "NewDesc" || len(n.Args) == 0 {
					return true
				}
				if pkg, ok := sel.X.(*ast.Ident); !ok || pkg.Name != "prometheus" {
					return true
				}
				if s, ok := stringLit(n.Args[0]); ok {
					record(s, n.Pos())
				}
			}
			return true
		})
		return nil
	})
	require.NoError(t, err)
	return found
}

func stringLit(e ast.Expr) (string, bool) {
	lit, ok := e.(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return s, err == nil
}

// fqName joins the parts of a metric name as prometheus.BuildFQName does.
func fqName(namespace, subsystem, name string) string {
	var parts []string
	for _, p := range []string{namespace, subsystem, name} {
		if p != "" {
			parts = append(parts, p)
		}
	}
	return strings.Join(parts, "_")
}

// resolve maps a series name to the metric that exports it: itself, or a
// histogram's name for its _bucket, _sum and _count series.
func resolve(name string, code map[string]string) (string, bool) {
	if _, ok := code[name]; ok {
		return name, true
	}
	for _, suf := range histogramSuffixes {
		if base, ok := strings.CutSuffix(name, suf); ok {
			if _, ok := code[base]; ok {
				return base, true
			}
		}
	}
	return name, false
}

// moduleRoot walks up from dir to the directory that holds go.mod.
func moduleRoot(t *testing.T, dir string) string {
	t.Helper()
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			t.Fatalf("no go.mod above %s", dir)
		}
	}
}

// --- Grafana dashboards ---

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row holds its panels
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Definition string          `json:"definition"`
	Datasource json.RawMessage `json:"datasource"`
}

// queryText is a variable's query: a string, or an object with a query field.
func (v variable) queryText() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	_ = json.Unmarshal(v.Query, &o)
	return o.Query
}

type dsRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// loadedDashboard is one parsed dashboard file and the metrics it names.
type loadedDashboard struct {
	file string
	dash dashboard
	refs []ref
}

// loadDashboards parses every *.json under dir (Grafana's file provider
// loads them all) and collects the metric names in panel targets and
// template variables. A name that appears in the file anywhere else is
// reported too, so nothing escapes the check.
func loadDashboards(t *testing.T, dir string) []loadedDashboard {
	t.Helper()
	var out []loadedDashboard
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".json") {
			return err
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		var db dashboard
		if err := json.Unmarshal(raw, &db); err != nil {
			return fmt.Errorf("dashboard %s: %w", rel, err)
		}
		ld := loadedDashboard{file: rel, dash: db}
		seen := map[string]bool{}
		add := func(where, text string) {
			for _, m := range metricRef.FindAllString(text, -1) {
				ld.refs = append(ld.refs, ref{file: rel, where: where, metric: m})
				seen[m] = true
			}
		}
		walkPanels(db.Panels, func(p panel) {
			for _, tg := range p.Targets {
				add(fmt.Sprintf("panel %q (target %s)", p.Title, tg.RefID), tg.Expr)
			}
		})
		for _, v := range db.Templating.List {
			add(fmt.Sprintf("variable %q", v.Name), v.queryText()+" "+v.Definition)
		}
		for _, m := range metricRef.FindAllString(string(raw), -1) {
			if !seen[m] {
				ld.refs = append(ld.refs, ref{file: rel, where: "outside any panel target or variable", metric: m})
				seen[m] = true
			}
		}
		out = append(out, ld)
		return nil
	})
	require.NoError(t, err)
	return out
}

func walkPanels(ps []panel, fn func(panel)) {
	for _, p := range ps {
		fn(p)
		walkPanels(p.Panels, fn)
	}
}

// --- Prometheus config and rules ---

type promConfig struct {
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName string `yaml:"job_name"`
	} `yaml:"scrape_configs"`
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	dec.KnownFields(false)
	require.NoError(t, dec.Decode(v), "parse %s", path)
}

var jobMatcher = regexp.MustCompile(`\bjob\s*=\s*"([^"]+)"`)

// The dashboards and alert rules name only metrics the code exports, and
// every metric the code exports is on some dashboard.
func TestDashboardsMatchExportedMetrics(t *testing.T) {
	dir, err := os.Getwd()
	require.NoError(t, err)
	root := moduleRoot(t, dir)

	code := codeMetrics(t, root, dir)
	require.NotEmpty(t, code, "found no llorch_* metric in the Go code under %s: the scan is broken, not the dashboards", root)
	t.Logf("%d metrics exported by the code", len(code))

	var problems []string
	check := func(r ref) (string, bool) {
		m, ok := resolve(r.metric, code)
		if !ok {
			problems = append(problems, fmt.Sprintf("%s, %s: metric %s is not exported by the code", r.file, r.where, r.metric))
		}
		return m, ok
	}

	// Dashboards.
	dashboards := loadDashboards(t, dir)
	require.NotEmpty(t, dashboards, "no *.json dashboard under %s", dir)
	onDashboard := map[string]bool{}
	uids := map[string]string{}
	for _, d := range dashboards {
		if d.dash.UID == "" || d.dash.Title == "" {
			problems = append(problems, fmt.Sprintf("%s: a dashboard needs a uid and a title", d.file))
		}
		if other, dup := uids[d.dash.UID]; dup {
			problems = append(problems, fmt.Sprintf("%s: uid %q is also the uid of %s", d.file, d.dash.UID, other))
		}
		uids[d.dash.UID] = d.file
		if len(d.refs) == 0 {
			problems = append(problems, fmt.Sprintf("%s: names no llorch_* metric", d.file))
		}
		walkPanels(d.dash.Panels, func(p panel) {
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					problems = append(problems, fmt.Sprintf("%s, panel %q (target %s): empty expr", d.file, p.Title, tg.RefID))
				}
			}
			if p.Type != "row" && len(p.Targets) > 0 && p.Title == "" {
				problems = append(problems, fmt.Sprintf("%s, panel id %d: no title", d.file, p.ID))
			}
		})
		for _, r := range d.refs {
			if m, ok := check(r); ok {
				onDashboard[m] = true
			}
		}
	}

	// Alert rules: the files prometheus.yml loads.
	var prom promConfig
	readYAML(t, filepath.Join(dir, "prometheus.yml"), &prom)
	require.NotEmpty(t, prom.RuleFiles, "prometheus.yml loads no rule file")
	jobs := map[string]bool{}
	for _, sc := range prom.ScrapeConfigs {
		jobs[sc.JobName] = true
	}
	rules := 0
	for _, pattern := range prom.RuleFiles {
		files, err := filepath.Glob(filepath.Join(dir, pattern))
		require.NoError(t, err)
		require.NotEmpty(t, files, "prometheus.yml rule_files %q matches no file in %s", pattern, dir)
		for _, path := range files {
			rel, _ := filepath.Rel(dir, path)
			var rf ruleFile
			readYAML(t, path, &rf)
			for _, g := range rf.Groups {
				for _, r := range g.Rules {
					rules++
					name := r.Alert + r.Record
					where := fmt.Sprintf("group %q, rule %q", g.Name, name)
					if r.Alert != "" && r.Labels["severity"] == "" {
						problems = append(problems, fmt.Sprintf("%s, %s: no severity label", rel, where))
					}
					if r.Alert != "" && r.Annotations["summary"] == "" {
						problems = append(problems, fmt.Sprintf("%s, %s: no summary annotation", rel, where))
					}
					for _, m := range metricRef.FindAllString(r.Expr, -1) {
						check(ref{file: rel, where: where, metric: m})
					}
					for _, j := range jobMatcher.FindAllStringSubmatch(r.Expr, -1) {
						if !jobs[j[1]] {
							problems = append(problems, fmt.Sprintf("%s, %s: job %q is not a scrape job in prometheus.yml", rel, where, j[1]))
						}
					}
				}
			}
		}
	}
	require.Positive(t, rules, "the rule files hold no rule")

	// Every exported metric is on a dashboard.
	var missing []string
	for m, at := range code {
		if !onDashboard[m] {
			missing = append(missing, fmt.Sprintf("%s (defined at %s)", m, at))
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		problems = append(problems, "exported by the code but on no dashboard: "+strings.Join(missing, ", "))
	}

	slices.Sort(problems)
	if len(problems) > 0 {
		known := make([]string, 0, len(code))
		for m := range code {
			known = append(known, m)
		}
		slices.Sort(known)
		t.Fatalf("dashboards and rules are out of step with the code:\n  %s\nmetrics the code exports: %s",
			strings.Join(problems, "\n  "), strings.Join(known, ", "))
	}
}

// Every Prometheus datasource a dashboard names is its own datasource
// variable or one that Grafana provisioning creates.
func TestDashboardDatasources(t *testing.T) {
	dir, err := os.Getwd()
	require.NoError(t, err)

	provisioned := map[string]bool{}
	files, err := filepath.Glob(filepath.Join(dir, "provisioning", "datasources", "*.yml"))
	require.NoError(t, err)
	require.NotEmpty(t, files, "no datasource provisioning file")
	for _, f := range files {
		var p struct {
			Datasources []struct {
				UID  string `yaml:"uid"`
				Type string `yaml:"type"`
			} `yaml:"datasources"`
		}
		readYAML(t, f, &p)
		for _, ds := range p.Datasources {
			if ds.Type == "prometheus" && ds.UID != "" {
				provisioned[ds.UID] = true
			}
		}
	}
	require.NotEmpty(t, provisioned, "no Prometheus datasource with a uid is provisioned")

	for _, d := range loadDashboards(t, dir) {
		vars := map[string]bool{}
		for _, v := range d.dash.Templating.List {
			if v.Type == "datasource" {
				vars[v.Name] = true
			}
		}
		ok := func(raw json.RawMessage) error {
			if len(raw) == 0 || string(raw) == "null" {
				return nil // inherits the panel's or the default
			}
			var r dsRef
			if err := json.Unmarshal(raw, &r); err != nil {
				return fmt.Errorf("datasource %s: want {type, uid}", raw)
			}
			if r.Type != "prometheus" {
				return nil
			}
			name := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(r.UID, "$"), "{"), "}")
			if strings.HasPrefix(r.UID, "$") && vars[name] {
				return nil
			}
			if provisioned[r.UID] {
				return nil
			}
			return fmt.Errorf("datasource uid %q is neither a datasource variable of the dashboard nor provisioned", r.UID)
		}
		walkPanels(d.dash.Panels, func(p panel) {
			require.NoError(t, ok(p.Datasource), "%s, panel %q", d.file, p.Title)
			for _, tg := range p.Targets {
				require.NoError(t, ok(tg.Datasource), "%s, panel %q (target %s)", d.file, p.Title, tg.RefID)
			}
		})
		for _, v := range d.dash.Templating.List {
			require.NoError(t, ok(v.Datasource), "%s, variable %q", d.file, v.Name)
		}
	}
}

// promtool, where installed, checks the config and runs the alert rules'
// unit tests (alerts_test.yml).
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip("promtool not installed (Debian: apt-get install prometheus); config and alert rule unit tests not run")
	}
	require.NoError(t, err)
	for _, args := range [][]string{
		{"check", "config", "prometheus.yml"},
		{"check", "rules", "alerts.yml"},
		{"test", "rules", "alerts_test.yml"},
	} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		require.NoError(t, err, "promtool %s:\n%s", strings.Join(args, " "), out)
	}
}
