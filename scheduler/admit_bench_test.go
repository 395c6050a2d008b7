package scheduler

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/llorch/llorch/placement"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/task"
)

// noStart stands in for control.Tasks: the workflow start is Temporal's
// round trip, not the placement decision measured here.
type noStart struct{}

func (noStart) Start(context.Context, task.Request) error { return nil }

// clusterOf is n nodes with two Ready pools each (a tenth serve another
// model), as issue 11's placement aim sizes it: 1000 nodes, 2000 pools.
func clusterOf(n int) []placement.Candidate {
	cands := make([]placement.Candidate, 0, 2*n)
	for i := range n {
		for p := range 2 {
			model := "m"
			if i%10 == 0 {
				model = "other"
			}
			cands = append(cands, placement.Candidate{PoolID: fmt.Sprintf("pool-%d-%d", i, p), NodeID: fmt.Sprintf("node-%d", i),
				ModelID: model, URL: "http://127.0.0.1:1", Epoch: 1, State: pool.Ready, NodeOnline: true,
				SlotsTotal: 4, FreeVRAM: uint64((i*7919)%1000) << 30})
		}
	}
	return cands
}

// BenchmarkAdmit1000Nodes measures placement from admission: Scheduler.Admit
// of a task (servable check, queue, slot grant over 2000 pools) until its
// slot is granted, against placement.Choose over the same candidates in the
// same run. Each admitted task's slot is released after, so the cluster
// stays as free as it started.
func BenchmarkAdmit1000Nodes(b *testing.B) {
	cands := clusterOf(1000)
	s := &Scheduler{Source: func(context.Context) ([]placement.Candidate, error) { return cands, nil }, Tasks: noStart{}}
	ctx := context.Background()
	s.refresh(ctx)
	r := placement.Request{ModelID: "m"}
	pure := make([]time.Duration, 0, 1000)
	for range 1000 {
		t0 := time.Now()
		if _, err := placement.Choose(cands, r); err != nil {
			b.Fatal(err)
		}
		pure = append(pure, time.Since(t0))
	}
	admit := make([]time.Duration, 0, b.N)
	i := 0
	for b.Loop() {
		id := fmt.Sprintf("t-%d", i)
		i++
		t0 := time.Now()
		adm, err := s.Admit(ctx, task.Request{TaskID: id, ModelID: "m", Priority: task.Interactive, EnqueuedAt: t0})
		w, ok := s.Granted(id)
		admit = append(admit, time.Since(t0))
		if err != nil || !ok || adm.Position != 0 {
			b.Fatalf("admission %d: %+v granted=%v err=%v", i, adm, ok, err)
		}
		s.Release(id, w.PoolID, 0)
	}
	p := func(d []time.Duration, q float64) time.Duration {
		slices.Sort(d)
		return d[min(len(d)-1, int(q*float64(len(d))))]
	}
	a50, a99, c50 := p(admit, 0.5), p(admit, 0.99), p(pure, 0.5)
	b.ReportMetric(float64(a99.Microseconds())/1000, "admit-p99-ms")
	b.Logf("2000 pools on 1000 nodes: admission to slot p50 %v, p99 %v (aim p99 < 1 ms); placement.Choose alone p50 %v (%.1fx)",
		a50, a99, c50, float64(a50)/float64(max(c50, 1)))
}
