package quota

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/llorch/llorch/apikey"
)

// WorkflowType is the registered name of the quota workflow.
const WorkflowType = "Quota"

const workflowIDPrefix = "quota:"

// WorkflowID is the id of a key's quota workflow.
func WorkflowID(keyID string) string { return workflowIDPrefix + keyID }

// KeyIDFromWorkflowID reads the key id out of quota:<id>, the inverse of
// WorkflowID.
func KeyIDFromWorkflowID(workflowID string) (string, bool) {
	id, ok := strings.CutPrefix(workflowID, workflowIDPrefix)
	return id, ok && id != ""
}

var keyIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidateKeyID checks a key id a caller names (a route's :id).
func ValidateKeyID(id string) error {
	if !keyIDPattern.MatchString(id) {
		return fmt.Errorf("key id %q is invalid: want 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit", id)
	}
	return nil
}

// Workflow messages.
const (
	// UpdateAdmit admits one task of the key (AdmitRequest -> AdmitResult),
	// or refuses it with an ErrExceeded application error whose details are
	// a Refusal. A refusal is the validator's: it leaves no history.
	UpdateAdmit = "admit"
	// SignalRelease ends a task's admission (Release): its concurrency
	// frees, its tokens count.
	SignalRelease = "release"
	// QueryState reads the counters (State).
	QueryState = "state"
)

// ErrExceeded is the error type of a refused admission (and the API code).
const ErrExceeded = "QUOTA_EXCEEDED"

// The limits' names, as refusals, the API and metrics labels spell them.
const (
	RequestsPerMinute = "requests_per_minute"
	TokensPerMinute   = "tokens_per_minute"
	ConcurrentTasks   = "concurrent_tasks"
)

// Window is the span the per-minute limits count over.
const Window = time.Minute

// ConcurrencyRetry is the Retry-After of a refusal for concurrency: a
// task's end is not foreseeable, so the client tries again soon.
const ConcurrencyRetry = time.Second

// Input starts (or continues as new) a key's quota workflow.
type Input struct {
	KeyID string `json:"key_id"`
	// Carry is the state a run continued as new from; nil for a new key.
	Carry *State `json:"carry,omitempty"`
	// MaxEvents continues the run as new past this many history events
	// (0: when Temporal suggests it, or at DefaultMaxEvents).
	MaxEvents int `json:"max_events,omitempty"`
	// SweepAfter is how old an admission is before the sweep asks whether
	// its task still runs, and how often the sweep runs while tasks are in
	// flight (0: DefaultSweepAfter; tests shorten it).
	SweepAfter time.Duration `json:"sweep_after,omitempty"`
}

// DefaultSweepAfter: a task's workflow starts within moments of its
// admission, so an admission a minute old whose task:<id> is not running
// is an orphan (its replica died before the start, or the workflow was
// terminated by hand).
const DefaultSweepAfter = time.Minute

// SweepBatch bounds one sweep's work: the tasks it asks about.
const SweepBatch = 50

// DefaultMaxEvents bounds one run's history: an admission takes about five
// events, a release about four.
const DefaultMaxEvents = 8000

// AdmitRequest asks to admit task TaskID under the key's limits (the key's
// current ones: a changed limit applies from the next admission).
type AdmitRequest struct {
	TaskID string        `json:"task_id"`
	Limits apikey.Limits `json:"limits"`
}

// AdmitResult is an admission. New is false when the task was admitted
// already (a retried admission): a failed start releases only a new one.
type AdmitResult struct {
	New bool `json:"new"`
}

// Refusal is why an admission was refused: the limit it met, when the
// window frees a unit of it, and the figures then.
type Refusal struct {
	Limit        string `json:"limit"`
	Allowed      int    `json:"allowed"`
	Used         int    `json:"used"`
	RetryAfterMs int64  `json:"retry_after_ms"`
}

// Release ends task TaskID's admission with the tokens it took in and
// produced. A task released twice, or never admitted, changes nothing,
// but for a task of a key without limits (Unadmitted): its request and
// tokens count at its end, once.
type Release struct {
	TaskID    string `json:"task_id"`
	TokensIn  int    `json:"tokens_in"`
	TokensOut int    `json:"tokens_out"`
	// Unadmitted: the task ran without an admission (its key had no
	// limits, so it made no round trip at its start); the release counts
	// its request too. The task workflow sends it with signal-with-start,
	// which may repeat: State.Reported dedups it.
	Unadmitted bool `json:"unadmitted,omitempty"`
}

// Bucket is one second of the window: admissions and the tokens of the
// tasks that ended in it.
type Bucket struct {
	Sec       int64 `json:"sec"` // unix seconds
	Requests  int   `json:"requests"`
	TokensIn  int   `json:"tokens_in"`
	TokensOut int   `json:"tokens_out"`
}

// State is a key's counters: what the query returns and continue-as-new
// carries.
type State struct {
	KeyID string `json:"key_id"`
	// Limits are those of the last admission.
	Limits    apikey.Limits `json:"limits"`
	Requests  int64         `json:"requests"` // admitted, ever
	TokensIn  int64         `json:"tokens_in"`
	TokensOut int64         `json:"tokens_out"`
	// InFlight are the admitted tasks not released yet, oldest first (a
	// slice, not a map: workflow code never iterates a map).
	InFlight []Admitted `json:"in_flight"`
	// Buckets are the window's seconds that saw something, oldest first.
	Buckets []Bucket `json:"buckets"`
	// Reported are the unadmitted tasks counted within the last
	// ReportedFor, oldest first: a repeated report counts once.
	Reported []Admitted `json:"reported,omitempty"`
}

// ReportedFor is how long an unadmitted task's report is remembered (past
// the retries of the local activity that sends it), and ReportedMax how
// many at most (the state is a continue-as-new payload: it stays small).
const (
	ReportedFor = 2 * time.Minute
	ReportedMax = 1000
)

// Admitted is a task in flight and when it was admitted; Checked is when
// the sweep last found its task running (zero: never asked).
type Admitted struct {
	TaskID  string    `json:"task_id"`
	At      time.Time `json:"at"`
	Checked time.Time `json:"checked,omitzero"`
}

// Holds says whether task taskID is in flight.
func (s State) Holds(taskID string) bool { return s.index(taskID) >= 0 }

func (s State) index(taskID string) int {
	return slices.IndexFunc(s.InFlight, func(a Admitted) bool { return a.TaskID == taskID })
}

// Expire drops the admissions made before cutoff (oldest first) and
// returns their task ids.
func (s *State) Expire(cutoff time.Time) []string {
	var gone []string
	for len(s.InFlight) > 0 && s.InFlight[0].At.Before(cutoff) {
		gone = append(gone, s.InFlight[0].TaskID)
		s.InFlight = s.InFlight[1:]
	}
	return gone
}

// Stale returns up to n tasks in flight that are due a sweep at now: admitted
// more than after ago and not found running within the last after, the
// longest unchecked first, so a sweep moves on past live long tasks.
func (s State) Stale(now time.Time, after time.Duration, n int) []string {
	cutoff := now.Add(-after)
	var due []Admitted
	for _, a := range s.InFlight {
		if a.At.Before(cutoff) && a.Checked.Before(cutoff) {
			due = append(due, a)
		}
	}
	slices.SortStableFunc(due, func(a, b Admitted) int { return a.Checked.Compare(b.Checked) })
	var ids []string
	for _, a := range due[:min(n, len(due))] {
		ids = append(ids, a.TaskID)
	}
	return ids
}

// Checked marks the tasks found running at now.
func (s *State) Checked(now time.Time, taskIDs []string) {
	for _, id := range taskIDs {
		if i := s.index(id); i >= 0 {
			s.InFlight[i].Checked = now
		}
	}
}

// Usage is a key's figures as the API shows them, at At.
type Usage struct {
	KeyID  string        `json:"key_id"`
	Limits apikey.Limits `json:"limits"`
	// Metered is false for a key none of whose tasks was admitted under
	// limits or has ended yet (no quota workflow: zero figures).
	Metered             bool      `json:"metered"`
	Requests            int64     `json:"requests"`
	RequestsLastMinute  int       `json:"requests_last_minute"`
	TokensIn            int64     `json:"tokens_in"`
	TokensOut           int64     `json:"tokens_out"`
	TokensInLastMinute  int       `json:"tokens_in_last_minute"`
	TokensOutLastMinute int       `json:"tokens_out_last_minute"`
	ConcurrentTasks     int       `json:"concurrent_tasks"`
	At                  time.Time `json:"at"`
}

// Usage is s's figures at now.
func (s State) Usage(now time.Time) Usage {
	w := s.window(now)
	return Usage{KeyID: s.KeyID, Limits: s.Limits, Metered: true, Requests: s.Requests, TokensIn: s.TokensIn, TokensOut: s.TokensOut,
		RequestsLastMinute: w.Requests, TokensInLastMinute: w.TokensIn, TokensOutLastMinute: w.TokensOut,
		ConcurrentTasks: len(s.InFlight), At: now}
}

// window sums the buckets within Window of now.
func (s State) window(now time.Time) Bucket {
	var sum Bucket
	from := windowStart(now)
	for _, b := range s.Buckets {
		if b.Sec >= from {
			sum.Requests += b.Requests
			sum.TokensIn += b.TokensIn
			sum.TokensOut += b.TokensOut
		}
	}
	return sum
}

// windowStart is the oldest second still in the window at now.
func windowStart(now time.Time) int64 { return now.Unix() - int64(Window/time.Second) + 1 }

// Prune drops the buckets that left the window, and the reports older
// than ReportedFor.
func (s *State) Prune(now time.Time) {
	from := windowStart(now)
	i := 0
	for i < len(s.Buckets) && s.Buckets[i].Sec < from {
		i++
	}
	s.Buckets = append(s.Buckets[:0], s.Buckets[i:]...)
	i = 0
	for i < len(s.Reported) && s.Reported[i].At.Before(now.Add(-ReportedFor)) {
		i++
	}
	s.Reported = append(s.Reported[:0], s.Reported[i:]...)
}

// reported says whether an unadmitted task was counted already (Prune
// keeps the list to ReportedFor).
func (s State) reported(now time.Time, taskID string) bool {
	return slices.ContainsFunc(s.Reported, func(a Admitted) bool {
		return a.TaskID == taskID && !a.At.Before(now.Add(-ReportedFor))
	})
}

// bucket is the bucket of now's second, added when missing.
func (s *State) bucket(now time.Time) *Bucket {
	sec := now.Unix()
	if n := len(s.Buckets); n > 0 && s.Buckets[n-1].Sec >= sec {
		return &s.Buckets[n-1] // a clock never goes back in a history; same second
	}
	s.Buckets = append(s.Buckets, Bucket{Sec: sec})
	return &s.Buckets[len(s.Buckets)-1]
}

// Check decides an admission at now under l: nil to admit, else the
// refusal of the limit that frees last (so its Retry-After is one that
// admits). Tokens per minute admit while the window's tokens are below the
// limit: a task's tokens count when it ends, so tasks in flight may finish
// past it.
func (s State) Check(now time.Time, l apikey.Limits) *Refusal {
	w := s.window(now)
	var worst *Refusal
	consider := func(r *Refusal) {
		if worst == nil || r.RetryAfterMs > worst.RetryAfterMs {
			worst = r
		}
	}
	if l.ConcurrentTasks > 0 && len(s.InFlight) >= l.ConcurrentTasks {
		consider(&Refusal{Limit: ConcurrentTasks, Allowed: l.ConcurrentTasks, Used: len(s.InFlight), RetryAfterMs: ConcurrencyRetry.Milliseconds()})
	}
	if l.RequestsPerMinute > 0 && w.Requests >= l.RequestsPerMinute {
		consider(&Refusal{Limit: RequestsPerMinute, Allowed: l.RequestsPerMinute, Used: w.Requests,
			RetryAfterMs: s.freesAt(now, w.Requests-l.RequestsPerMinute+1, func(b Bucket) int { return b.Requests })})
	}
	if used := w.TokensIn + w.TokensOut; l.TokensPerMinute > 0 && used >= l.TokensPerMinute {
		consider(&Refusal{Limit: TokensPerMinute, Allowed: l.TokensPerMinute, Used: used,
			RetryAfterMs: s.freesAt(now, used-l.TokensPerMinute+1, func(b Bucket) int { return b.TokensIn + b.TokensOut })})
	}
	return worst
}

// freesAt is how long until the oldest buckets holding at least need units
// leave the window (at least a millisecond).
func (s State) freesAt(now time.Time, need int, units func(Bucket) int) int64 {
	from := windowStart(now)
	for _, b := range s.Buckets {
		if b.Sec < from {
			continue
		}
		if need -= units(b); need <= 0 {
			leaves := time.Unix(b.Sec, 0).Add(Window)
			return max(leaves.Sub(now).Milliseconds(), 1)
		}
	}
	return Window.Milliseconds()
}

// Admit records task taskID's admission at now; false when it was admitted
// already.
func (s *State) Admit(now time.Time, taskID string, l apikey.Limits) bool {
	s.Limits = l
	if s.Holds(taskID) {
		return false
	}
	s.InFlight = append(s.InFlight, Admitted{TaskID: taskID, At: now})
	s.Requests++
	s.bucket(now).Requests++
	return true
}

// Release ends a task's admission at now: false when it was not in flight
// (released already, or never admitted), and nothing is counted. An
// unadmitted task's release counts its request, at its end, unless it was
// counted within ReportedFor.
func (s *State) Release(now time.Time, r Release) bool {
	if i := s.index(r.TaskID); i >= 0 {
		s.InFlight = slices.Delete(s.InFlight, i, i+1)
	} else if !r.Unadmitted || s.reported(now, r.TaskID) {
		return false
	} else {
		if len(s.Reported) >= ReportedMax {
			s.Reported = slices.Delete(s.Reported, 0, len(s.Reported)-ReportedMax+1)
		}
		s.Reported = append(s.Reported, Admitted{TaskID: r.TaskID, At: now})
		s.Requests++
		s.bucket(now).Requests++
	}
	in, out := max(r.TokensIn, 0), max(r.TokensOut, 0)
	s.TokensIn += int64(in)
	s.TokensOut += int64(out)
	if in+out > 0 {
		b := s.bucket(now)
		b.TokensIn += in
		b.TokensOut += out
	}
	return true
}
