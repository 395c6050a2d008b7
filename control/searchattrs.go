package control

import (
	"context"
	"log/slog"
	"strings"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/operatorservice/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
	"github.com/llorch/llorch/task"
)

// SearchAttributes are the typed (Keyword) search attributes llorch's
// workflows set, so every place that registers them (llorch dev, the
// apiserver, the test harness) registers the same set.
var SearchAttributes = []temporal.SearchAttributeKeyKeyword{node.NodeIDKey, node.NodeStateKey, model.ModelIDKey, pool.PoolIDKey, pool.StateKey,
	task.StateKey, task.OwnerKey, task.SessionKey}

// EnsureSearchAttributes registers llorch's typed search attributes when the
// namespace lacks them. Managed clusters may forbid it; then it only warns,
// since the operator must add them (see README). It reports whether the
// namespace has them all.
func EnsureSearchAttributes(ctx context.Context, c client.Client, namespace string, log *slog.Logger) bool {
	want := map[string]enumspb.IndexedValueType{}
	for _, k := range SearchAttributes {
		want[k.GetName()] = enumspb.INDEXED_VALUE_TYPE_KEYWORD
	}
	have, err := c.OperatorService().ListSearchAttributes(ctx, &operatorservice.ListSearchAttributesRequest{Namespace: namespace})
	if err != nil {
		log.Warn("cannot list search attributes", "err", err)
		return false
	}
	for name := range want {
		if _, ok := have.GetCustomAttributes()[name]; ok {
			delete(want, name)
		}
	}
	if len(want) == 0 {
		return true
	}
	if _, err := c.OperatorService().AddSearchAttributes(ctx, &operatorservice.AddSearchAttributesRequest{
		Namespace: namespace, SearchAttributes: want,
	}); err != nil && !registered(ctx, c, namespace, want) { // another replica may have added them meanwhile
		names := make([]string, 0, len(SearchAttributes))
		for _, k := range SearchAttributes {
			names = append(names, k.GetName())
		}
		log.Warn("cannot add search attributes; add them (Keyword) to the namespace: "+strings.Join(names, ", "), "err", err)
		return false
	}
	log.Info("registered search attributes", "namespace", namespace)
	return true
}

// registered says whether the namespace has every attribute of want.
func registered(ctx context.Context, c client.Client, namespace string, want map[string]enumspb.IndexedValueType) bool {
	have, err := c.OperatorService().ListSearchAttributes(ctx, &operatorservice.ListSearchAttributesRequest{Namespace: namespace})
	if err != nil {
		return false
	}
	for name := range want {
		if _, ok := have.GetCustomAttributes()[name]; !ok {
			return false
		}
	}
	return true
}
