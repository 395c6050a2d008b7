package workflows

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
	"github.com/stretchr/testify/suite"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/node"
)

type nodeSuite struct {
	suite.Suite
	testsuite.WorkflowTestSuite
	env *testsuite.TestWorkflowEnvironment
}

func TestNodeWorkflow(t *testing.T) { suite.Run(t, new(nodeSuite)) }

func (s *nodeSuite) SetupTest() {
	s.env = s.NewTestWorkflowEnvironment()
	s.env.RegisterWorkflow(Node)
	s.env.RegisterActivity(&activities.NodeActivities{})
	s.env.RegisterActivity(&activities.ControlActivities{})
}

var (
	na *activities.NodeActivities
	ca *activities.ControlActivities
)

func session(n int) interface{} {
	return mock.MatchedBy(func(in node.LivenessInput) bool { return in.Session == n })
}

func heartbeatTimeout() error {
	return temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_HEARTBEAT, errors.New("no heartbeat"))
}

func workerRegistration(id string) node.Registration {
	return node.Registration{NodeID: id, Agent: node.AgentWorker, Identity: "worker@test", HeartbeatInterval: time.Second,
		Inventory: node.Inventory{GPUs: []node.GPU{{Index: 0, Name: "NVIDIA H100 80GB HBM3", MemoryTotalBytes: 80 << 30, MemoryFreeBytes: 60 << 30}}}}
}

// at runs fn at workflow time d after start.
func (s *nodeSuite) at(d time.Duration, fn func()) { s.env.RegisterDelayedCallback(fn, d) }

func (s *nodeSuite) status() node.Status {
	v, err := s.env.QueryWorkflow(node.QueryStatus)
	s.Require().NoError(err)
	var st node.Status
	s.Require().NoError(v.Get(&st))
	return st
}

func (s *nodeSuite) state() node.State { return s.status().State }

func (s *nodeSuite) expectState(d time.Duration, want node.State) {
	s.at(d, func() { s.Equal(want, s.state(), "state at %s", d) })
}

func (s *nodeSuite) update(name string) {
	s.env.UpdateWorkflow(name, "", &testsuite.TestUpdateCallback{
		OnReject:   func(err error) { s.Fail("update rejected", "%s: %v", name, err) },
		OnAccept:   func() {},
		OnComplete: func(any, error) {},
	}, node.Request{Reason: "test", Identity: "token:abcdef"})
}

func (s *nodeSuite) register(d time.Duration, r node.Registration) {
	s.at(d, func() { s.env.SignalWorkflow(node.SignalRegister, r) })
}

func (s *nodeSuite) alive(d time.Duration, session int) {
	s.at(d, func() { s.env.SignalWorkflow(node.SignalAlive, node.Alive{Session: session}) })
}

// runUntilDeregistered deregisters the node at d and runs its workflow,
// which must end without error.
func (s *nodeSuite) runUntilDeregistered(d time.Duration, nodeID string) {
	s.at(d, func() { s.update(node.UpdateDeregister) })
	s.env.ExecuteWorkflow(Node, node.Input{NodeID: nodeID})
	s.Require().NoError(s.env.GetWorkflowError())
}

// continuedAsNew is the input the workflow continued as new with.
func (s *nodeSuite) continuedAsNew() node.Input {
	err := s.env.GetWorkflowError()
	var can *workflow.ContinueAsNewError
	s.Require().True(errors.As(err, &can), "want continue-as-new, got %v", err)
	var in node.Input
	s.Require().NoError(converter.GetDefaultDataConverter().FromPayloads(can.Input, &in))
	return in
}

// The worker-agent life: Registering -> Online -> Offline (heartbeat
// timeout) -> Online (probe served) -> Draining -> Online -> Left.
func (s *nodeSuite) TestWorkerLifecycle() {
	s.env.OnActivity(na.Liveness, mock.Anything, session(1)).After(10 * time.Second).Return(heartbeatTimeout())
	s.env.OnActivity(na.Liveness, mock.Anything, session(2)).After(time.Hour).Return(nil)
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)

	s.expectState(500*time.Millisecond, node.Registering)
	s.register(time.Second, workerRegistration("gpu-1"))
	s.expectState(1500*time.Millisecond, node.Registering)
	s.at(2*time.Second, func() { s.env.SignalWorkflow(node.SignalAlive, node.Alive{Session: 1, Identity: "worker@test"}) })
	s.expectState(3*time.Second, node.Online)
	s.expectState(12*time.Second, node.Offline)
	// A late alive from the timed-out session must not revive the node.
	s.alive(13*time.Second, 1)
	s.expectState(14*time.Second, node.Offline)
	s.alive(15*time.Second, 2)
	s.expectState(16*time.Second, node.Online)
	s.at(20*time.Second, func() { s.update(node.UpdateDrain) })
	s.expectState(21*time.Second, node.Draining)
	s.at(22*time.Second, func() { s.update(node.UpdateUndrain) })
	s.expectState(23*time.Second, node.Online)
	s.runUntilDeregistered(25*time.Second, "gpu-1")
	s.Require().True(s.env.IsWorkflowCompleted())
	var st node.Status
	s.Require().NoError(s.env.GetWorkflowResult(&st))
	s.Equal(node.Left, st.State)
	var path []node.State
	for _, t := range st.Transitions {
		path = append(path, t.To)
	}
	s.Equal([]node.State{node.Online, node.Offline, node.Online, node.Draining, node.Online, node.Left}, path)
	s.Contains(st.Transitions[1].Reason, "no heartbeat for 3s")
}

// A suspicion (an apiserver lost the node's link) is confirmed by a probe
// on the node's queue: answered, the node stays Online (and the suspicion
// is counted); unanswered, it is Offline at once, long before its
// heartbeat would time out, and the next session's alive brings it back.
func (s *nodeSuite) TestSuspicionProbed() {
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	probes := 0
	s.env.OnActivity(na.Probe, mock.Anything, mock.Anything).Return(func(_ context.Context, in node.ProbeInput) error {
		probes++
		s.Equal("gpu-1", in.NodeID)
		if probes == 1 {
			return nil
		}
		return temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START, errors.New("not taken"))
	})
	r := workerRegistration("gpu-1")
	r.HeartbeatInterval = 10 * time.Second // the heartbeat alone would take 30 s
	s.register(time.Second, r)
	s.alive(2*time.Second, 1)
	s.expectState(3*time.Second, node.Online)
	suspect := func(d time.Duration) {
		s.at(d, func() {
			s.env.SignalWorkflow(node.SignalSuspect, node.Suspicion{By: "apiserver@a", Reason: "connection refused"})
		})
	}
	suspect(4 * time.Second)
	s.at(5*time.Second, func() {
		st := s.status()
		s.Equal(node.Online, st.State, "an answered probe clears the suspicion")
		s.Equal(1, st.Suspicions)
	})
	suspect(6 * time.Second)
	s.expectState(7*time.Second, node.Offline)
	s.at(7500*time.Millisecond, func() {
		st := s.status()
		s.Contains(st.Transitions[len(st.Transitions)-1].Reason, "link lost (apiserver@a: connection refused) and no answer to a probe within 2s")
		s.Equal(2, st.Session, "a parked session waits for the node")
	})
	suspect(8 * time.Second) // an Offline node needs no probe
	s.alive(9*time.Second, 2)
	s.expectState(10*time.Second, node.Online)
	s.runUntilDeregistered(12*time.Second, "gpu-1")
	s.Equal(2, probes)
}

// Draining is sticky across an outage: a drained node that comes back is
// Draining, not Online.
func (s *nodeSuite) TestDrainSurvivesOutage() {
	s.env.OnActivity(na.Liveness, mock.Anything, session(1)).After(5 * time.Second).Return(heartbeatTimeout())
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)

	s.register(time.Second, workerRegistration("gpu-2"))
	s.alive(2*time.Second, 1)
	s.at(3*time.Second, func() { s.update(node.UpdateDrain) })
	s.expectState(4*time.Second, node.Draining)
	s.expectState(7*time.Second, node.Offline)
	s.alive(8*time.Second, 2)
	s.expectState(9*time.Second, node.Draining)
	s.runUntilDeregistered(10*time.Second, "gpu-2")
}

// A worker that is registered but never serves its session goes Offline
// after one liveness timeout (schedule-to-start), never stays Registering.
func (s *nodeSuite) TestRegisteredButNeverServed() {
	s.env.OnActivity(na.Liveness, mock.Anything, session(1)).After(3 * time.Second).
		Return(temporal.NewTimeoutError(enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START, nil))
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	s.register(time.Second, workerRegistration("gpu-3"))
	s.expectState(2*time.Second, node.Registering)
	s.expectState(5*time.Second, node.Offline)
	s.runUntilDeregistered(6*time.Second, "gpu-3")
}

// A re-registration (restarted worker) replaces the running session.
func (s *nodeSuite) TestReRegistrationStartsNewSession() {
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	s.register(time.Second, workerRegistration("gpu-4"))
	s.alive(2*time.Second, 1)
	s.expectState(3*time.Second, node.Online)
	s.register(4*time.Second, workerRegistration("gpu-4"))
	s.expectState(5*time.Second, node.Registering)
	s.alive(6*time.Second, 1)
	s.expectState(7*time.Second, node.Registering)
	s.alive(8*time.Second, 2)
	s.expectState(9*time.Second, node.Online)
	s.runUntilDeregistered(10*time.Second, "gpu-4")
}

// An HTTP agent is Online on registration, Offline when its beats stop, and
// Online again on its next REST heartbeat (delivered as alive).
func (s *nodeSuite) TestHTTPAgentLifecycle() {
	s.env.OnActivity(ca.AwaitHTTPHeartbeats, mock.Anything, session(1)).After(30 * time.Second).Return(heartbeatTimeout())
	s.env.OnActivity(ca.AwaitHTTPHeartbeats, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	reg := node.Registration{NodeID: "ext-1", Agent: node.AgentHTTP, Identity: "token:abcdef", HeartbeatInterval: 10 * time.Second}
	s.register(time.Second, reg)
	s.expectState(2*time.Second, node.Online)
	s.expectState(32*time.Second, node.Offline)
	s.alive(40*time.Second, 1)
	s.expectState(41*time.Second, node.Online)
	s.at(42*time.Second, func() {
		st := s.status()
		s.Equal(2, st.Session)
		s.Equal("liveness-2", st.LivenessActivityID)
	})
	s.runUntilDeregistered(43*time.Second, "ext-1")
}

// Continue-as-new carries the node's state: agent, inventory, drain flag,
// transitions and the session counter.
func (s *nodeSuite) TestContinueAsNewCarriesState() {
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	s.register(time.Second, workerRegistration("gpu-6"))
	s.alive(2*time.Second, 1)
	s.at(3*time.Second, func() { s.update(node.UpdateDrain) })
	// The test environment keeps no history: set the length the server would report.
	s.at(4*time.Second, func() { s.env.SetCurrentHistoryLength(30) })
	s.alive(5*time.Second, 1)
	s.env.ExecuteWorkflow(Node, node.Input{NodeID: "gpu-6", ContinueAsNewAfterEvents: 25})

	in := s.continuedAsNew()
	s.Require().NotNil(in.Carried)
	s.Equal(node.Draining, in.Carried.State)
	s.True(in.Carried.Draining)
	s.Equal(node.AgentWorker, in.Carried.Agent)
	s.Equal("NVIDIA H100 80GB HBM3", in.Carried.Inventory.GPUs[0].Name)
	s.Equal(25, in.ContinueAsNewAfterEvents)
	s.GreaterOrEqual(in.Carried.Session, 1)
}

func TestWorkflowIDs(t *testing.T) {
	id, ok := node.IDFromWorkflowID(node.WorkflowID("gpu-7"))
	require.True(t, ok)
	require.Equal(t, "gpu-7", id)
	require.Equal(t, "node.gpu-7", node.TaskQueue("gpu-7"))
	require.NoError(t, node.ValidateID("gpu-7.rack2_a"))
	for _, bad := range []string{"", "GPU", "-a", "a/b", "a:b", string(make([]byte, 64))} {
		require.Error(t, node.ValidateID(bad), bad)
	}
}

// The server's suggestion alone triggers continue-as-new.
func (s *nodeSuite) TestContinueAsNewOnSuggestion() {
	s.env.OnActivity(na.Liveness, mock.Anything, mock.Anything).After(time.Hour).Return(nil)
	s.register(time.Second, workerRegistration("gpu-8"))
	s.at(2*time.Second, func() { s.env.SetContinueAsNewSuggested(true) })
	s.alive(3*time.Second, 1)
	s.env.ExecuteWorkflow(Node, node.Input{NodeID: "gpu-8"})
	in := s.continuedAsNew()
	s.Equal(node.Online, in.Carried.State, "the alive that arrived before the hand-over is applied")
}
