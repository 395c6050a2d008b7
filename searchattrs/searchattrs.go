// Package searchattrs lists the typed (Keyword) search attributes llorch's
// workflows set, so every place that registers them (llorch dev, the
// apiserver, the test harness) registers the same set.
package searchattrs

import (
	"go.temporal.io/sdk/temporal"

	"github.com/llorch/llorch/model"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/pool"
)

// All are the search attributes a namespace must have for llorch.
var All = []temporal.SearchAttributeKeyKeyword{node.NodeIDKey, node.NodeStateKey, model.ModelIDKey, pool.PoolIDKey}
