package testenv

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// ReportEnv names the file where failure-scenario trials are recorded, one
// JSON line each; `just chaos` prints its summary table from it.
const ReportEnv = "LLORCH_CHAOS_REPORT"

// TrialRecord is one run of a failure scenario.
type TrialRecord struct {
	Scenario  string  `json:"scenario"`
	Test      string  `json:"test"`
	Passed    bool    `json:"passed"`
	RecoverMs float64 `json:"recover_ms,omitempty"` // 0: not measured
	Note      string  `json:"note,omitempty"`
}

// Trial records how one run of a scenario went, when the test ends.
type Trial struct {
	mu  sync.Mutex
	rec TrialRecord
}

var reportMu sync.Mutex

// NewTrial starts the record of a run of scenario by t. It is written (to
// $LLORCH_CHAOS_REPORT, when set) once t and its cleanups are done, passed
// unless t failed.
func NewTrial(t *testing.T, scenario string) *Trial {
	tr := &Trial{rec: TrialRecord{Scenario: scenario, Test: t.Name()}}
	path := os.Getenv(ReportEnv)
	if path == "" {
		return tr
	}
	t.Cleanup(func() {
		tr.mu.Lock()
		rec := tr.rec
		tr.mu.Unlock()
		rec.Passed = !t.Failed()
		b, _ := json.Marshal(rec)
		reportMu.Lock()
		defer reportMu.Unlock()
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			t.Logf("chaos report: %v", err)
			return
		}
		defer f.Close()
		_, _ = f.Write(append(b, '\n'))
	})
	return tr
}

// Recovered notes how long the system took to be whole again, and how
// that was seen.
func (tr *Trial) Recovered(d time.Duration, note string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.rec.RecoverMs = float64(d.Microseconds()) / 1000
	tr.rec.Note = note
}

// Summary reads the trials in path and renders the table: scenario, trials,
// passed, time to recover (median and worst). ok is false when a trial
// failed or none was recorded.
func Summary(path string) (table string, ok bool, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", false, err
	}
	type row struct {
		trials, passed int
		recover        []float64
		note           string
	}
	rows := map[string]*row{}
	var order []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var rec TrialRecord
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			return "", false, fmt.Errorf("%s: %w", path, err)
		}
		r := rows[rec.Scenario]
		if r == nil {
			r = &row{}
			rows[rec.Scenario] = r
			order = append(order, rec.Scenario)
		}
		r.trials++
		if rec.Passed {
			r.passed++
			if rec.RecoverMs > 0 {
				r.recover = append(r.recover, rec.RecoverMs)
			}
			r.note = rec.Note
		}
	}
	ok = len(order) > 0
	var sb strings.Builder
	fmt.Fprintf(&sb, "| scenario | trials | passed | time to recover (median, max) | recovered means |\n|---|---|---|---|---|\n")
	for _, name := range order {
		r := rows[name]
		ok = ok && r.passed == r.trials
		rec := "-"
		if len(r.recover) > 0 {
			sort.Float64s(r.recover)
			rec = fmt.Sprintf("%s, %s", ms(r.recover[len(r.recover)/2]), ms(r.recover[len(r.recover)-1]))
		}
		fmt.Fprintf(&sb, "| %s | %d | %d | %s | %s |\n", name, r.trials, r.passed, rec, r.note)
	}
	return sb.String(), ok, nil
}

func ms(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.2f s", v/1000)
	}
	return fmt.Sprintf("%.0f ms", v)
}
