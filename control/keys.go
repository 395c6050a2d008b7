package control

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/apikey"
	"github.com/llorch/llorch/node"
)

// Errors of key calls.
var (
	ErrKeyNotFound = errors.New("key not found")
	ErrKeyExists   = errors.New("key exists")
)

// InvalidKeyError is a create the registry refused: Field names the field.
type InvalidKeyError struct{ Field, Message string }

func (e *InvalidKeyError) Error() string { return e.Message }

// Keys is the client side of the API key registry (one workflow per
// namespace, apikey.RegistryWorkflowID): create, revoke, read. Whichever
// call comes first starts it.
type Keys struct {
	Temporal client.Client
	// ContinueAsNewAfterEvents is passed to a registry this client starts
	// (0: when Temporal suggests).
	ContinueAsNewAfterEvents int
}

// startOptions start the registry if it is not running. A registry that
// was terminated starts afresh, empty: its keys are gone (the bootstrap
// token still is admin), which fails closed.
func (c *Keys) startOptions() client.StartWorkflowOptions {
	return client.StartWorkflowOptions{
		ID:                       apikey.RegistryWorkflowID,
		TaskQueue:                node.ControlTaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		StaticSummary:            "API keys: records and hashes, never secrets",
	}
}

// input is a fresh registry's: a new stream key, no records. A registry
// that runs already keeps its own (USE_EXISTING).
func (c *Keys) input() (apikey.RegistryInput, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return apikey.RegistryInput{}, fmt.Errorf("no randomness for the stream key: %w", err)
	}
	return apikey.RegistryInput{StreamKey: k, ContinueAsNewAfterEvents: c.ContinueAsNewAfterEvents}, nil
}

// Ensure starts the registry unless it runs.
func (c *Keys) Ensure(ctx context.Context) error {
	in, err := c.input()
	if err != nil {
		return err
	}
	if _, err := c.Temporal.ExecuteWorkflow(ctx, c.startOptions(), apikey.RegistryWorkflowType, in); err != nil {
		return fmt.Errorf("start the API key registry: %w", err)
	}
	return nil
}

// Create adds a key (update-with-start).
func (c *Keys) Create(ctx context.Context, req apikey.CreateRequest) (apikey.Record, error) {
	var rec apikey.Record
	in, err := c.input()
	if err != nil {
		return rec, err
	}
	err = updateWithStart(ctx, c.Temporal, c.startOptions(), apikey.RegistryWorkflowType, in, apikey.UpdateCreate, req, &rec)
	return rec, keyError(err, req.ID)
}

// Revoke revokes a key; a revoked key's record comes back unchanged.
func (c *Keys) Revoke(ctx context.Context, id string, by apikey.Actor) (apikey.Record, error) {
	var rec apikey.Record
	h, err := c.Temporal.UpdateWorkflow(ctx, client.UpdateWorkflowOptions{
		WorkflowID: apikey.RegistryWorkflowID, UpdateName: apikey.UpdateRevoke,
		Args: []any{apikey.RevokeRequest{ID: id, By: by}}, WaitForStage: client.WorkflowUpdateStageCompleted,
	})
	if err == nil {
		err = h.Get(ctx, &rec)
	}
	return rec, keyError(notFound(err, ErrKeyNotFound), id)
}

// Snapshot reads the registry; Keys is nil when its version is since.
// A registry that does not run yet is started (it then has no keys).
func (c *Keys) Snapshot(ctx context.Context, since int64) (apikey.Snapshot, error) {
	var s apikey.Snapshot
	v, err := c.Temporal.QueryWorkflow(ctx, apikey.RegistryWorkflowID, "", apikey.QueryKeys, since)
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) {
		if err := c.Ensure(ctx); err != nil {
			return s, err
		}
		v, err = c.Temporal.QueryWorkflow(ctx, apikey.RegistryWorkflowID, "", apikey.QueryKeys, since)
	}
	if err == nil {
		err = v.Get(&s)
	}
	if err != nil {
		return s, fmt.Errorf("read the API key registry: %w", err)
	}
	return s, nil
}

// Get reads one key's record; ErrKeyNotFound when the registry has none.
func (c *Keys) Get(ctx context.Context, id string) (apikey.Record, error) {
	s, err := c.Snapshot(ctx, -1)
	if err != nil {
		return apikey.Record{}, err
	}
	for _, r := range s.Keys {
		if r.ID == id {
			return r, nil
		}
	}
	return apikey.Record{}, ErrKeyNotFound
}

func keyError(err error, id string) error {
	if err == nil {
		return nil
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		switch app.Type() {
		case apikey.ErrNotFound:
			return ErrKeyNotFound
		case apikey.ErrExists:
			return ErrKeyExists
		case apikey.ErrInvalid:
			e := &InvalidKeyError{Message: app.Message()}
			if app.HasDetails() && app.Details(&e.Field) == nil {
				e.Message = strings.TrimPrefix(e.Message, e.Field+": ")
			}
			return e
		}
	}
	if errors.Is(err, ErrKeyNotFound) {
		return err
	}
	return fmt.Errorf("API key %s: %w", id, err)
}
