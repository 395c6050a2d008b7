#!/bin/sh
# One-shot: register llorch's typed search attributes (Keyword) in the
# namespace. The apiserver tries the same at start; doing it here first means
# workers never race it. Idempotent: an attribute that exists is left alone.
set -eu

address="${TEMPORAL_ADDRESS:-temporal:7233}"
namespace="${TEMPORAL_NAMESPACE:-default}"

tries=0
until temporal operator search-attribute list --address "$address" --namespace "$namespace" >/dev/null 2>&1; do
	tries=$((tries + 1))
	if [ "$tries" -ge 120 ]; then
		echo "namespace $namespace not reachable at $address after 120 s" >&2
		exit 1
	fi
	sleep 1
done

for name in NodeId NodeState ModelId PoolId PoolState; do
	if temporal operator search-attribute list --address "$address" --namespace "$namespace" | grep -qw "$name"; then
		echo "search attribute $name already in namespace $namespace"
	else
		temporal operator search-attribute create --address "$address" --namespace "$namespace" \
			--name "$name" --type Keyword
		echo "search attribute $name (Keyword) added to namespace $namespace"
	fi
done
