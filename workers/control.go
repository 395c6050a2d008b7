package workers

import (
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/activities"
	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/quota"
	"github.com/llorch/llorch/scheduler"
	"github.com/llorch/llorch/session"
	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/workflows"
)

// NewControl is the control worker: every workflow, plus the activities that
// belong beside them, on the shared control queue.
// tasks may be nil (no task workflows are served then). quotas, at most
// one, serves the quota workflows with its token counter (default: none).
func NewControl(c client.Client, catalog *activities.CatalogActivities, tasks *scheduler.TaskControl, quotas ...*workflows.Quotas) worker.Worker {
	w := worker.New(c, node.ControlTaskQueue, worker.Options{})
	q := &workflows.Quotas{}
	if len(quotas) > 0 && quotas[0] != nil {
		q = quotas[0]
	}
	w.RegisterWorkflowWithOptions(q.Quota, workflow.RegisterOptions{Name: quota.WorkflowType})
	w.RegisterWorkflowWithOptions(workflows.Node, workflow.RegisterOptions{Name: node.WorkflowType})
	w.RegisterWorkflowWithOptions(workflows.Stage, workflow.RegisterOptions{Name: model.StageWorkflowType})
	w.RegisterWorkflowWithOptions(workflows.GC, workflow.RegisterOptions{Name: model.GCWorkflowType})
	w.RegisterWorkflowWithOptions(workflows.Pool, workflow.RegisterOptions{Name: pool.WorkflowType})
	w.RegisterWorkflowWithOptions(workflows.Session, workflow.RegisterOptions{Name: session.WorkflowType})
	w.RegisterWorkflowWithOptions(workflows.Keys, workflow.RegisterOptions{Name: apikey.RegistryWorkflowType})
	if tasks != nil {
		w.RegisterWorkflowWithOptions(workflows.Task, workflow.RegisterOptions{Name: task.WorkflowType})
		w.RegisterActivity(tasks)
	}
	w.RegisterActivity(&activities.StagingControl{Client: c})
	w.RegisterActivity(&activities.ControlActivities{})
	w.RegisterActivity(&activities.QuotaControl{Quotas: &control.Quotas{Temporal: c}})
	if catalog != nil {
		w.RegisterActivity(catalog)
	}
	return w
}
