package quota

import (
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/llorch/llorch/apikey"
)

// The window slides by the second: admissions leave it a minute after
// theirs; the refusal names the limit that frees last, with when.
func TestWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var s State
	l := apikey.Limits{RequestsPerMinute: 2, ConcurrentTasks: 5}
	if !s.Admit(t0, "a", l) || !s.Admit(t0.Add(10*time.Second), "b", l) || s.Admit(t0, "a", l) {
		t.Fatal("admit: want a, b new and a again not")
	}
	r := s.Check(t0.Add(20*time.Second), l)
	if r == nil || r.Limit != RequestsPerMinute || r.RetryAfterMs != 40000 {
		t.Fatalf("at 20 s: %+v, want requests_per_minute in 40 s", r)
	}
	if r := s.Check(t0.Add(60*time.Second), l); r != nil {
		t.Fatalf("at 60 s a's second has left: %+v", r)
	}
	// Concurrency and requests both full: the later of the two is named.
	s.Admit(t0.Add(60*time.Second), "c", l)
	l.ConcurrentTasks = 3
	if r := s.Check(t0.Add(61*time.Second), l); r == nil || r.Limit != RequestsPerMinute || r.RetryAfterMs != 9000 {
		t.Fatalf("at 61 s: %+v", r)
	}
	s.Prune(t0.Add(75 * time.Second))
	if len(s.Buckets) != 1 || s.Buckets[0].Sec != 1060 {
		t.Fatalf("prune: %+v", s.Buckets)
	}
	if r := s.Check(t0.Add(75*time.Second), l); r == nil || r.Limit != ConcurrentTasks || r.RetryAfterMs != ConcurrencyRetry.Milliseconds() {
		t.Fatalf("at 75 s: %+v, want concurrent_tasks", r)
	}
	// A release frees its unit once and counts its tokens once.
	if !s.Release(t0.Add(76*time.Second), Release{TaskID: "b", TokensIn: 3, TokensOut: 4}) || s.Release(t0, Release{TaskID: "b", TokensIn: 3}) {
		t.Fatal("release: want b once")
	}
	tl := apikey.Limits{TokensPerMinute: 7}
	if r := s.Check(t0.Add(77*time.Second), tl); r == nil || r.Limit != TokensPerMinute || r.Used != 7 || r.RetryAfterMs != 59000 {
		t.Fatalf("tokens: %+v", r)
	}
	u := s.Usage(t0.Add(77 * time.Second))
	if u.TokensIn != 3 || u.TokensOut != 4 || u.ConcurrentTasks != 2 || u.Requests != 3 || u.RequestsLastMinute != 1 {
		t.Fatalf("usage: %+v", u)
	}
	if gone := s.Expire(t0.Add(time.Second)); len(gone) != 1 || gone[0] != "a" || s.Holds("a") || !s.Holds("c") {
		t.Fatalf("expire: %v, in flight %+v", gone, s.InFlight)
	}
	if ValidateKeyID("k-1") != nil || ValidateKeyID("../x") == nil || ValidateKeyID("") == nil {
		t.Fatal("ValidateKeyID")
	}
	if id, ok := KeyIDFromWorkflowID(WorkflowID("k1")); !ok || id != "k1" {
		t.Fatal("KeyIDFromWorkflowID")
	}
}

// A task of a key without limits counts at its end, request and tokens,
// once however often its report comes; a plain release of a task never
// admitted still counts nothing.
func TestUnadmittedRelease(t *testing.T) {
	t0 := time.Unix(2000, 0)
	var s State
	r := Release{TaskID: "u1", TokensIn: 2, TokensOut: 9, Unadmitted: true}
	if !s.Release(t0, r) || s.Release(t0.Add(time.Second), r) {
		t.Fatal("want u1 counted once")
	}
	if s.Release(t0, Release{TaskID: "u2", TokensOut: 4}) {
		t.Fatal("a release of a task never admitted counts nothing")
	}
	u := s.Usage(t0.Add(time.Second))
	if u.Requests != 1 || u.RequestsLastMinute != 1 || u.TokensIn != 2 || u.TokensOut != 9 || u.ConcurrentTasks != 0 {
		t.Fatalf("usage: %+v", u)
	}
	// The memory of reports is bounded in time and in size.
	s.Prune(t0.Add(ReportedFor + time.Second))
	if len(s.Reported) != 0 {
		t.Fatalf("reports past ReportedFor: %+v", s.Reported)
	}
	for i := range ReportedMax + 5 {
		s.Release(t0.Add(ReportedFor+2*time.Second), Release{TaskID: "m" + strconv.Itoa(i), Unadmitted: true})
	}
	if len(s.Reported) != ReportedMax || s.Reported[0].TaskID != "m5" {
		t.Fatalf("reports: %d, first %+v", len(s.Reported), s.Reported[0])
	}
}

// The sweep's picks: admissions older than after, at most n, those never
// checked (or checked longest ago) first, so live long tasks do not hide
// the orphans behind them.
func TestStale(t *testing.T) {
	t0 := time.Unix(3000, 0)
	var s State
	l := apikey.Limits{}
	for i, id := range []string{"a", "b", "c", "d"} {
		s.Admit(t0.Add(time.Duration(i)*time.Second), id, l)
	}
	now := t0.Add(62 * time.Second)
	if got := s.Stale(now, time.Minute, 2); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("first sweep: %v", got)
	}
	s.Checked(now, []string{"a", "b"})
	if got := s.Stale(now.Add(time.Second), time.Minute, 2); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("second sweep: %v, want c (d is a minute old only at 63 s)", got)
	}
	if got := s.Stale(now.Add(61*time.Second), time.Minute, 10); !slices.Equal(got, []string{"c", "d", "a", "b"}) {
		t.Fatalf("a minute on: %v", got)
	}
}
