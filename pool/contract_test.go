package pool

import "testing"

func TestWorkflowIDRoundTrip(t *testing.T) {
	for _, tc := range []struct{ node, pool string }{{"gpu-1", "p1"}, {"n.a_b-c", "llama-3.q4"}} {
		id, ok := IDFromWorkflowID(WorkflowID(tc.node, tc.pool))
		if !ok || id != tc.pool {
			t.Errorf("IDFromWorkflowID(WorkflowID(%q, %q)) = %q, %v", tc.node, tc.pool, id, ok)
		}
	}
	for _, wid := range []string{"node:gpu-1", "task:p1", "stage:gpu-1:abc", ""} {
		if id, ok := IDFromWorkflowID(wid); ok {
			t.Errorf("IDFromWorkflowID(%q) = %q, true; want false", wid, id)
		}
	}
}
