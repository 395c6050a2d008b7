package workflows

import (
	"errors"
	"fmt"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/node"
)

// Node is the durable life of one node: it is registered by its agent,
// proves liveness through a long heartbeating activity, and is Offline as
// soon as that activity times out. It ends only when the node leaves.
func Node(ctx workflow.Context, in node.Input) (node.Status, error) {
	n := newNodeWF(ctx, in)
	if err := n.setup(ctx); err != nil {
		return n.st, err
	}
	return n.run(ctx)
}

type nodeWF struct {
	in          node.Input
	st          node.Status
	registering bool // registered, liveness not yet confirmed
	left        bool
	rejoin      *node.Registration // a registration received after left

	wake           workflow.Channel // handlers nudge the main loop
	liveness       workflow.Future  // current session; nil when none runs
	cancelLiveness workflow.CancelFunc
	probe          workflow.Future // a suspicion's probe; nil when none runs
	probeSession   int             // the session the probe checks
	suspicion      node.Suspicion  // what started the probe
}

func newNodeWF(ctx workflow.Context, in node.Input) *nodeWF {
	n := &nodeWF{in: in, wake: workflow.NewBufferedChannel(ctx, 1)}
	if in.LivenessLease == 0 {
		n.in.LivenessLease = node.DefaultLivenessLease
	}
	if in.Carried != nil {
		n.st = *in.Carried
		n.registering = n.st.State == node.Registering
		n.st.Runs++
	} else {
		n.st = node.Status{NodeID: in.NodeID, State: node.Registering}
	}
	n.st.LivenessActivityID = ""
	return n
}

func (n *nodeWF) setup(ctx workflow.Context) error {
	if err := workflow.SetQueryHandler(ctx, node.QueryStatus, func() (node.Status, error) {
		return n.snapshot(), nil
	}); err != nil {
		return err
	}
	updates := []struct {
		name    string
		handler func(workflow.Context, node.Request) (node.Status, error)
	}{
		{node.UpdateDrain, n.onDrain(true)},
		{node.UpdateUndrain, n.onDrain(false)},
		{node.UpdateDeregister, n.onDeregister},
	}
	for _, u := range updates {
		if err := workflow.SetUpdateHandlerWithOptions(ctx, u.name, u.handler, workflow.UpdateHandlerOptions{
			Validator: n.validateRequest,
		}); err != nil {
			return err
		}
	}
	n.publish(ctx)
	return nil
}

func (n *nodeWF) run(ctx workflow.Context) (node.Status, error) {
	log := workflow.GetLogger(ctx)
	register := workflow.GetSignalChannel(ctx, node.SignalRegister)
	alive := workflow.GetSignalChannel(ctx, node.SignalAlive)
	suspect := workflow.GetSignalChannel(ctx, node.SignalSuspect)

	// A carried node with an agent resumes its liveness at once: a worker
	// agent proves itself again within one timeout or goes Offline.
	if n.in.Register != nil {
		n.onRegister(ctx, *n.in.Register)
	} else if n.st.Agent == node.AgentWorker || (n.st.Agent == node.AgentHTTP && n.st.Connected) {
		n.startLiveness(ctx)
	}
	for !n.left {
		sel := workflow.NewSelector(ctx)
		sel.AddReceive(register, func(c workflow.ReceiveChannel, _ bool) {
			var r node.Registration
			c.Receive(ctx, &r)
			n.onRegister(ctx, r)
		})
		sel.AddReceive(alive, func(c workflow.ReceiveChannel, _ bool) {
			var a node.Alive
			c.Receive(ctx, &a)
			n.onAlive(ctx, a)
		})
		sel.AddReceive(suspect, func(c workflow.ReceiveChannel, _ bool) {
			var s node.Suspicion
			c.Receive(ctx, &s)
			n.onSuspect(ctx, s)
		})
		sel.AddReceive(n.wake, func(c workflow.ReceiveChannel, _ bool) { c.Receive(ctx, nil) })
		if f := n.liveness; f != nil {
			sel.AddFuture(f, func(f workflow.Future) { n.onLivenessEnded(ctx, f) })
		}
		if f := n.probe; f != nil {
			sel.AddFuture(f, func(f workflow.Future) { n.onProbeEnded(ctx, f) })
		}
		sel.Select(ctx)

		if !n.left && n.shouldContinueAsNew(ctx) {
			// Hand over only between events: finish queued signals and
			// running update handlers so nothing is lost.
			n.drainSignals(ctx, register, alive)
			if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
				return n.st, err
			}
			n.drainSignals(ctx, register, alive) // any that arrived while handlers finished
			drainSuspicions(suspect)
			if n.left {
				break
			}
			n.stopLiveness()
			carried := n.snapshot()
			log.Info("continuing as new", "node_id", n.st.NodeID, "history_length", workflow.GetInfo(ctx).GetCurrentHistoryLength())
			return carried, workflow.NewContinueAsNewError(ctx, Node, node.Input{
				NodeID: n.in.NodeID, Carried: &carried,
				ContinueAsNewAfterEvents: n.in.ContinueAsNewAfterEvents, LivenessLease: n.in.LivenessLease,
			})
		}
	}
	n.stopLiveness()
	n.drainSignals(ctx, register, alive)
	if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
		return n.st, err
	}
	n.drainSignals(ctx, register, alive)
	drainSuspicions(suspect)
	if n.rejoin != nil {
		// The node registered again while it was leaving (a worker
		// restarted at that moment): its new life is a fresh run.
		log.Info("registered again while leaving; starting a new run", "node_id", n.st.NodeID)
		return n.snapshot(), workflow.NewContinueAsNewError(ctx, Node, node.Input{
			NodeID: n.in.NodeID, Register: n.rejoin,
			ContinueAsNewAfterEvents: n.in.ContinueAsNewAfterEvents, LivenessLease: n.in.LivenessLease,
		})
	}
	return n.snapshot(), nil
}

func (n *nodeWF) shouldContinueAsNew(ctx workflow.Context) bool {
	info := workflow.GetInfo(ctx)
	if info.GetContinueAsNewSuggested() {
		return true
	}
	return n.in.ContinueAsNewAfterEvents > 0 && info.GetCurrentHistoryLength() >= n.in.ContinueAsNewAfterEvents
}

// drainSignals applies signals already delivered, so none is dropped when
// the run ends.
func (n *nodeWF) drainSignals(ctx workflow.Context, register, alive workflow.ReceiveChannel) {
	for {
		var r node.Registration
		if register.ReceiveAsync(&r) {
			n.onRegister(ctx, r)
			continue
		}
		var a node.Alive
		if alive.ReceiveAsync(&a) {
			n.onAlive(ctx, a)
			continue
		}
		return
	}
}

func (n *nodeWF) onRegister(ctx workflow.Context, r node.Registration) {
	if n.left {
		n.rejoin = &r
		return
	}
	recordActor(ctx, r.Actor, "register")
	now := workflow.Now(ctx)
	if n.st.RegisteredAt.IsZero() {
		n.st.RegisteredAt = now
	}
	n.st.Agent = r.Agent
	if n.st.Agent == "" {
		n.st.Agent = node.AgentWorker
	}
	n.st.Identity = r.Identity
	n.st.Inventory = r.Inventory
	n.st.HeartbeatInterval = r.HeartbeatInterval
	if n.st.HeartbeatInterval <= 0 {
		n.st.HeartbeatInterval = node.DefaultHeartbeatInterval
	}
	n.st.LastSnapshot = snapshotOf(r, now)
	if n.st.Agent == node.AgentHTTP {
		// The REST call itself proves the agent is alive.
		n.st.Connected, n.registering = true, false
		n.st.LastSeen = now
	} else {
		n.st.Connected, n.registering = false, true
	}
	n.startLiveness(ctx)
	n.setState(ctx, "registered by "+r.Identity)
}

func (n *nodeWF) onAlive(ctx workflow.Context, a node.Alive) {
	if n.left {
		return
	}
	switch n.st.Agent {
	case node.AgentWorker:
		if a.Session != n.st.Session {
			return // a late word from a session already replaced
		}
	case node.AgentHTTP:
		if n.liveness == nil {
			n.startLiveness(ctx)
		}
	default:
		return // alive before any registration: nothing to attach it to
	}
	n.st.Connected, n.registering = true, false
	n.st.LastSeen = workflow.Now(ctx)
	n.st.LastSnapshot = a.Snapshot
	n.setState(ctx, fmt.Sprintf("liveness session %d confirmed by %s", n.st.Session, a.Identity))
}

// drainSuspicions drops suspicions delivered before the run ends: the next
// run's liveness session proves the node alive or not by itself.
func drainSuspicions(suspect workflow.ReceiveChannel) {
	for suspect.ReceiveAsync(nil) {
	}
}

// onSuspect probes a worker node an apiserver lost the link of: a task on
// the node's own queue that a live worker answers at once. One probe at a
// time; a node not believed alive needs none (its parked liveness session
// brings it back).
func (n *nodeWF) onSuspect(ctx workflow.Context, s node.Suspicion) {
	if n.left || n.st.Agent != node.AgentWorker || !n.st.Connected || n.probe != nil {
		return
	}
	n.suspicion, n.probeSession = s, n.st.Session
	opts := workflow.ActivityOptions{
		TaskQueue:              node.TaskQueue(n.st.NodeID),
		ScheduleToStartTimeout: node.ProbeTimeout,
		StartToCloseTimeout:    node.ProbeTimeout,
		RetryPolicy:            &temporal.RetryPolicy{MaximumAttempts: 1},
		Summary:                fmt.Sprintf("probe %s: %s lost its link (%s)", n.st.NodeID, s.By, s.Reason),
	}
	var na *activities.NodeActivities
	n.probe = workflow.ExecuteActivity(workflow.WithActivityOptions(ctx, opts), na.Probe,
		node.ProbeInput{NodeID: n.st.NodeID, Session: n.st.Session})
}

// onProbeEnded: an answered probe clears the suspicion; an unanswered one
// makes the node Offline at once, as a missed heartbeat would later.
func (n *nodeWF) onProbeEnded(ctx workflow.Context, f workflow.Future) {
	n.probe = nil
	err := f.Get(ctx, nil)
	if n.left || n.st.Session != n.probeSession || !n.st.Connected {
		return // the session changed meanwhile: the probe is about the past
	}
	if err == nil {
		n.st.Suspicions++
		workflow.GetLogger(ctx).Info("node answered its probe; suspicion cleared", "node_id", n.st.NodeID,
			"by", n.suspicion.By, "reason", n.suspicion.Reason)
		n.publish(ctx)
		return
	}
	n.st.Connected, n.registering = false, false
	n.startLiveness(ctx) // parks a probe session that the next worker brings back
	n.setState(ctx, fmt.Sprintf("link lost (%s: %s) and no answer to a probe within %s", n.suspicion.By, n.suspicion.Reason, node.ProbeTimeout))
}

func (n *nodeWF) onLivenessEnded(ctx workflow.Context, f workflow.Future) {
	n.liveness, n.cancelLiveness = nil, nil
	n.st.LivenessActivityID = ""
	err := f.Get(ctx, nil)
	var timeout *temporal.TimeoutError
	var appErr *temporal.ApplicationError
	switch {
	case err == nil:
		// Lease over: start the next session, nothing changed.
		n.startLiveness(ctx)
		return
	case errors.As(err, &timeout) && timeout.TimeoutType() == enumspb.TIMEOUT_TYPE_START_TO_CLOSE && n.st.Agent == node.AgentHTTP:
		n.startLiveness(ctx) // an HTTP agent's lease ends by its deadline
		return
	case errors.As(err, &appErr) && appErr.Type() == node.ErrGone:
		return
	}
	n.st.Connected = false
	n.registering = false
	if n.st.Agent == node.AgentWorker {
		// Park a probe on the node's queue: whichever worker serves it next
		// brings the node back.
		n.startLiveness(ctx)
	}
	n.setState(ctx, livenessLossReason(err, n.st.HeartbeatInterval))
}

func livenessLossReason(err error, interval time.Duration) string {
	var timeout *temporal.TimeoutError
	if errors.As(err, &timeout) {
		switch timeout.TimeoutType() {
		case enumspb.TIMEOUT_TYPE_HEARTBEAT:
			return fmt.Sprintf("no heartbeat for %s", node.LivenessTimeout(interval))
		case enumspb.TIMEOUT_TYPE_SCHEDULE_TO_START:
			return fmt.Sprintf("no worker took the liveness session within %s", node.LivenessTimeout(interval))
		}
	}
	return "liveness session failed: " + err.Error()
}

func (n *nodeWF) startLiveness(ctx workflow.Context) {
	n.stopLiveness()
	n.st.Session++
	timeout := node.LivenessTimeout(n.st.HeartbeatInterval)
	opts := workflow.ActivityOptions{
		ActivityID:          fmt.Sprintf("liveness-%d", n.st.Session),
		StartToCloseTimeout: n.in.LivenessLease + timeout,
		HeartbeatTimeout:    timeout,
		RetryPolicy:         &temporal.RetryPolicy{MaximumAttempts: 1},
		Summary:             fmt.Sprintf("liveness session %d of %s (beat every %s)", n.st.Session, n.st.NodeID, n.st.HeartbeatInterval),
	}
	in := node.LivenessInput{NodeID: n.st.NodeID, Session: n.st.Session, Interval: n.st.HeartbeatInterval, Lease: n.in.LivenessLease}
	lctx, cancel := workflow.WithCancel(ctx)
	if n.st.Agent == node.AgentHTTP {
		opts.TaskQueue = node.ControlTaskQueue
		var ca *activities.ControlActivities
		n.liveness = workflow.ExecuteActivity(workflow.WithActivityOptions(lctx, opts), ca.AwaitHTTPHeartbeats, in)
	} else {
		opts.TaskQueue = node.TaskQueue(n.st.NodeID)
		if n.st.Connected || n.registering {
			// A node believed alive must be served at once; an Offline
			// node's probe may wait in the queue as long as it takes.
			opts.ScheduleToStartTimeout = timeout
		}
		var na *activities.NodeActivities
		n.liveness = workflow.ExecuteActivity(workflow.WithActivityOptions(lctx, opts), na.Liveness, in)
	}
	n.cancelLiveness = cancel
	n.st.LivenessActivityID = opts.ActivityID
}

func (n *nodeWF) stopLiveness() {
	if n.cancelLiveness != nil {
		n.cancelLiveness()
	}
	n.liveness, n.cancelLiveness = nil, nil
	n.st.LivenessActivityID = ""
}

func (n *nodeWF) validateRequest(ctx workflow.Context, r node.Request) error {
	if n.left {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("node %s has left", n.st.NodeID), node.ErrLeft, nil)
	}
	if len(r.Reason) > node.MaxReasonLen {
		return fmt.Errorf("reason is longer than %d characters", node.MaxReasonLen)
	}
	return nil
}

func (n *nodeWF) onDrain(drain bool) func(workflow.Context, node.Request) (node.Status, error) {
	return func(ctx workflow.Context, r node.Request) (node.Status, error) {
		recordActor(ctx, r.Actor, map[bool]string{true: "drain", false: "undrain"}[drain])
		if n.st.Draining != drain {
			n.st.Draining = drain
			verb := map[bool]string{true: "drain", false: "undrain"}[drain]
			n.setState(ctx, requestReason(verb, r))
		}
		n.wake.SendAsync(struct{}{}) // let the main loop consider continue-as-new
		return n.snapshot(), nil
	}
}

func (n *nodeWF) onDeregister(ctx workflow.Context, r node.Request) (node.Status, error) {
	recordActor(ctx, r.Actor, "deregister")
	n.left = true
	n.stopLiveness()
	n.setState(ctx, requestReason("deregistered", r))
	n.wake.SendAsync(struct{}{})
	return n.snapshot(), nil
}

func requestReason(verb string, r node.Request) string {
	s := verb
	if r.Identity != "" {
		s += " by " + r.Identity
	}
	if r.Reason != "" {
		s += ": " + r.Reason
	}
	return s
}

func (n *nodeWF) derive() node.State {
	switch {
	case n.left:
		return node.Left
	case n.st.Connected && n.st.Draining:
		return node.Draining
	case n.st.Connected:
		return node.Online
	case n.registering || n.st.Agent == "":
		return node.Registering
	default:
		return node.Offline
	}
}

// setState records a change of derived state with its reason and makes it
// visible in the UI (search attributes, current details).
func (n *nodeWF) setState(ctx workflow.Context, reason string) {
	next := n.derive()
	if next != n.st.State {
		now := workflow.Now(ctx)
		n.st.Transitions = append(n.st.Transitions, node.Transition{From: n.st.State, To: next, Reason: reason, At: now})
		if len(n.st.Transitions) > node.MaxTransitions {
			n.st.Transitions = n.st.Transitions[len(n.st.Transitions)-node.MaxTransitions:]
		}
		workflow.GetLogger(ctx).Info("node state changed", "node_id", n.st.NodeID,
			"from", n.st.State, "to", next, "reason", reason)
		n.st.State, n.st.StateSince = next, now
	}
	n.publish(ctx)
}

func (n *nodeWF) publish(ctx workflow.Context) {
	_ = workflow.UpsertTypedSearchAttributes(ctx,
		node.NodeIDKey.ValueSet(n.st.NodeID), node.NodeStateKey.ValueSet(string(n.st.State)))
	workflow.SetCurrentDetails(ctx, details(n.st))
}

func (n *nodeWF) snapshot() node.Status {
	s := n.st
	s.Transitions = append([]node.Transition(nil), n.st.Transitions...)
	return s
}

func snapshotOf(r node.Registration, now time.Time) node.Snapshot {
	s := node.Snapshot{At: now, DiskFreeBytes: r.Inventory.DiskFreeBytes, Pools: r.Pools}
	for _, g := range r.Inventory.GPUs {
		s.GPUs = append(s.GPUs, node.GPUUsage{Index: g.Index, MemoryTotalBytes: g.MemoryTotalBytes,
			MemoryFreeBytes: g.MemoryFreeBytes, UtilizationPercent: g.UtilizationPercent})
	}
	return s
}

// details is the markdown the Temporal UI shows as the workflow's current
// details.
func details(s node.Status) string {
	var b strings.Builder
	b.WriteString(fmt.Sprintf("**State** %s since %s\n\n", s.State, s.StateSince.UTC().Format(time.RFC3339)))
	if !s.LastSeen.IsZero() {
		b.WriteString(fmt.Sprintf("**Last seen** %s\n\n", s.LastSeen.UTC().Format(time.RFC3339)))
	}
	var total uint64
	for _, g := range s.LastSnapshot.GPUs {
		total += g.MemoryTotalBytes
	}
	if len(s.LastSnapshot.GPUs) > 0 {
		b.WriteString(fmt.Sprintf("**Free VRAM** %.1f of %.1f GiB on %d GPUs (as of %s; live figures are in the heartbeat details of %s)\n\n",
			gib(s.LastSnapshot.FreeVRAMBytes()), gib(total), len(s.LastSnapshot.GPUs),
			s.LastSnapshot.At.UTC().Format(time.RFC3339), s.LivenessActivityID))
	} else {
		b.WriteString("**Free VRAM** none (CPU-only node)\n\n")
	}
	if s.Agent != "" {
		b.WriteString(fmt.Sprintf("**Agent** %s `%s`, session %d, heartbeat every %s\n\n", s.Agent, s.Identity, s.Session, s.HeartbeatInterval))
	}
	if n := len(s.Transitions); n > 0 {
		t := s.Transitions[n-1]
		b.WriteString(fmt.Sprintf("**Last change** %s → %s: %s\n", t.From, t.To, t.Reason))
	}
	return b.String()
}

func gib(b uint64) float64 { return float64(b) / (1 << 30) }
