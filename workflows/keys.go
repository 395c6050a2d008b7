package workflows

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/llorch/llorch/apikey"
)

// Keys is the API key registry: every key's record (its secret's hash,
// never the secret), created and revoked by updates, read by a query that
// every apiserver replica polls. The version grows with every change, so a
// poll with an unchanged version is answered without the records. It
// continues as new, carrying the records, once its history grows; records
// revoked or expired longer than apikey.PruneAfter are dropped then.
func Keys(ctx workflow.Context, in apikey.RegistryInput) error {
	k := &keysWF{in: in, records: in.Records, version: in.Version}
	if k.records == nil {
		k.records = []apikey.Record{}
	}
	if err := workflow.SetQueryHandler(ctx, apikey.QueryKeys, k.query); err != nil {
		return err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, apikey.UpdateCreate, k.onCreate,
		workflow.UpdateHandlerOptions{Validator: k.validateCreate}); err != nil {
		return err
	}
	if err := workflow.SetUpdateHandlerWithOptions(ctx, apikey.UpdateRevoke, k.onRevoke,
		workflow.UpdateHandlerOptions{Validator: k.validateRevoke}); err != nil {
		return err
	}
	k.details(ctx)
	if err := workflow.Await(ctx, func() bool { return k.continueAsNew(ctx) }); err != nil {
		return err
	}
	// Accepted updates finish before the run hands over.
	if err := workflow.Await(ctx, func() bool { return workflow.AllHandlersFinished(ctx) }); err != nil {
		return err
	}
	next := apikey.RegistryInput{StreamKey: in.StreamKey, Version: k.version + 1,
		ContinueAsNewAfterEvents: in.ContinueAsNewAfterEvents, Records: prune(k.records, workflow.Now(ctx))}
	return workflow.NewContinueAsNewError(ctx, apikey.RegistryWorkflowType, next)
}

type keysWF struct {
	in      apikey.RegistryInput
	records []apikey.Record // in creation order
	version int64
}

func (k *keysWF) continueAsNew(ctx workflow.Context) bool {
	info := workflow.GetInfo(ctx)
	if k.in.ContinueAsNewAfterEvents > 0 {
		return info.GetCurrentHistoryLength() >= k.in.ContinueAsNewAfterEvents
	}
	return info.GetContinueAsNewSuggested()
}

func (k *keysWF) query(since int64) (apikey.Snapshot, error) {
	s := apikey.Snapshot{Version: k.version, StreamKey: k.in.StreamKey}
	if since != k.version {
		s.Keys = k.records
	}
	return s, nil
}

func (k *keysWF) find(id string) int {
	return slices.IndexFunc(k.records, func(r apikey.Record) bool { return r.ID == id })
}

func invalidKey(err error) error {
	typ := apikey.ErrInvalid
	var fe *apikey.FieldError
	if errors.As(err, &fe) {
		// The field travels in the details, so the API names it.
		return temporal.NewNonRetryableApplicationError(err.Error(), typ, nil, fe.Field)
	}
	return temporal.NewNonRetryableApplicationError(err.Error(), typ, nil)
}

func (k *keysWF) validateCreate(ctx workflow.Context, r apikey.CreateRequest) error {
	if i := k.find(r.ID); i >= 0 {
		if k.records[i].Hash == r.Hash {
			return nil // a retried create: the handler answers the record
		}
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("key %s exists", r.ID), apikey.ErrExists, nil)
	}
	if err := r.Validate(workflow.Now(ctx)); err != nil {
		return invalidKey(err)
	}
	if len(k.records) >= apikey.MaxRecords {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("the registry holds %d keys, its most: revoke some first", len(k.records)), apikey.ErrInvalid, nil)
	}
	return nil
}

func (k *keysWF) onCreate(ctx workflow.Context, r apikey.CreateRequest) (apikey.Record, error) {
	if i := k.find(r.ID); i >= 0 {
		return k.records[i], nil
	}
	rec := apikey.Record{ID: r.ID, Name: r.Name, Scopes: r.Scopes, NodeID: r.NodeID, Hash: r.Hash,
		CreatedAt: workflow.Now(ctx), CreatedBy: r.CreatedBy, ExpiresAt: r.ExpiresAt, Limits: r.Limits}
	k.records = append(k.records, rec)
	k.version++
	workflow.GetLogger(ctx).Info("API key created", "key_id", r.ID, "name", r.Name, "scopes", r.Scopes, "by", r.CreatedBy.String())
	k.details(ctx)
	return rec, nil
}

func (k *keysWF) validateRevoke(ctx workflow.Context, r apikey.RevokeRequest) error {
	if k.find(r.ID) < 0 {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("key %s does not exist", r.ID), apikey.ErrNotFound, nil)
	}
	return nil
}

// onRevoke revokes a key; again is the same answer.
func (k *keysWF) onRevoke(ctx workflow.Context, r apikey.RevokeRequest) (apikey.Record, error) {
	i := k.find(r.ID)
	if i < 0 {
		return apikey.Record{}, temporal.NewNonRetryableApplicationError(fmt.Sprintf("key %s does not exist", r.ID), apikey.ErrNotFound, nil)
	}
	if k.records[i].RevokedAt.IsZero() {
		k.records[i].RevokedAt, k.records[i].RevokedBy = workflow.Now(ctx), r.By
		k.version++
		workflow.GetLogger(ctx).Info("API key revoked", "key_id", r.ID, "by", r.By.String())
		k.details(ctx)
	}
	return k.records[i], nil
}

func (k *keysWF) details(ctx workflow.Context) {
	live := 0
	now := workflow.Now(ctx)
	for _, r := range k.records {
		if r.Live(now) {
			live++
		}
	}
	workflow.SetCurrentDetails(ctx, fmt.Sprintf("**%d live keys** of %d records; version %d", live, len(k.records), k.version))
}

// prune drops records revoked or expired longer than apikey.PruneAfter.
func prune(records []apikey.Record, now time.Time) []apikey.Record {
	cut := now.Add(-apikey.PruneAfter)
	return slices.DeleteFunc(slices.Clone(records), func(r apikey.Record) bool {
		return !r.RevokedAt.IsZero() && r.RevokedAt.Before(cut) || !r.ExpiresAt.IsZero() && r.ExpiresAt.Before(cut)
	})
}
