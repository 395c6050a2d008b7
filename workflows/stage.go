package workflows

import (
	"fmt"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
)

// Staging timeouts. A worker that dies mid-download misses its heartbeats
// for StageHeartbeatTimeout; the retry then waits on the node's queue until a
// worker serves it again, for at most StageDeadline in all.
const (
	StageHeartbeatTimeout = 10 * time.Second
	StageDeadline         = 24 * time.Hour
)

// Stage puts a verified copy of a model into a node's local catalog. Its id,
// stage:<node>:<digest prefix>, makes concurrent requests join one download.
// The download activity resumes from its last checkpoint when retried; a
// checksum mismatch, a full disk or a missing object fail it for good.
func Stage(ctx workflow.Context, in model.StageRequest) (model.StageResult, error) {
	st := model.StageStatus{NodeID: in.NodeID, ModelID: in.Entry.ID, SHA256: in.Entry.SHA256,
		Phase: "downloading", BytesTotal: in.Entry.Size}
	if err := workflow.SetQueryHandler(ctx, model.QueryStageProgress, func() (model.StageStatus, error) { return st, nil }); err != nil {
		return model.StageResult{}, err
	}
	show := func() {
		workflow.SetCurrentDetails(ctx, fmt.Sprintf("**%s** %s onto node %s: %s, %d%% (%.1f of %.1f MiB)",
			st.Phase, st.ModelID, st.NodeID, shortSHA(st.SHA256), st.Percent,
			float64(st.BytesDone)/(1<<20), float64(st.BytesTotal)/(1<<20)))
	}
	show()
	progress := workflow.GetSignalChannel(ctx, model.SignalStageProgress)
	workflow.Go(ctx, func(ctx workflow.Context) {
		for {
			var p model.StageProgressSignal
			if !progress.Receive(ctx, &p) {
				return
			}
			st.BytesDone, st.Percent, st.Rate = p.BytesDone, p.Percent, p.RateBytesPerSec
			show()
		}
	})

	var a *activities.StagingActivities
	actx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		TaskQueue:              node.TaskQueue(in.NodeID),
		ScheduleToCloseTimeout: StageDeadline,
		StartToCloseTimeout:    StageDeadline,
		HeartbeatTimeout:       StageHeartbeatTimeout,
		RetryPolicy: &temporal.RetryPolicy{
			InitialInterval:        time.Second,
			BackoffCoefficient:     2,
			MaximumInterval:        30 * time.Second,
			NonRetryableErrorTypes: []string{model.ErrDiskFull, model.ErrChecksumMismatch, model.ErrObjectMissing},
		},
		Summary: fmt.Sprintf("download %s (%s, %d bytes) to node %s", in.Entry.ID, shortSHA(in.Entry.SHA256), in.Entry.Size, in.NodeID),
	})
	var res model.StageResult
	err := workflow.ExecuteActivity(actx, a.StageModel, activities.StageInput{
		NodeID: in.NodeID, Entry: in.Entry, WorkflowID: workflow.GetInfo(ctx).WorkflowExecution.ID,
	}).Get(ctx, &res)
	if err != nil {
		st.Phase = "failed"
		workflow.SetCurrentDetails(ctx, fmt.Sprintf("**failed** %s onto node %s: %v", st.ModelID, st.NodeID, err))
		return res, err
	}
	st.Phase, st.BytesDone, st.Percent = "ready", in.Entry.Size, 100
	show()
	return res, nil
}

func shortSHA(s string) string { return s[:min(len(s), 12)] }
