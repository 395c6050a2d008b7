package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A finding the code reaches in a module fails the check; one of the
// standard library is listed as waived; one the code does not reach (no
// function in its trace) is neither.
func TestFindings(t *testing.T) {
	raw := []byte(`{"config":{"protocol_version":"v1.0.0"}}
{"osv":{"id":"GO-2026-1"}}
{"finding":{"osv":"GO-2026-1","fixed_version":"v1.70.0","trace":[{"module":"github.com/valyala/fasthttp","version":"v1.51.0","package":"github.com/valyala/fasthttp","function":"parseChunkSize"},{"module":"github.com/llorch/llorch"}]}}
{"finding":{"osv":"GO-2026-1","fixed_version":"v1.70.0","trace":[{"module":"github.com/valyala/fasthttp","version":"v1.51.0","package":"github.com/valyala/fasthttp","function":"parseChunkSize"}]}}
{"finding":{"osv":"GO-2026-2","fixed_version":"v1.26.9","trace":[{"module":"stdlib","version":"v1.26.8","package":"net/http","function":"Read"}]}}
{"finding":{"osv":"GO-2026-3","fixed_version":"v0.62.0","trace":[{"module":"golang.org/x/net","version":"v0.60.0"}]}}
`)
	called, toolchain, err := findings(raw)
	require.NoError(t, err)
	require.Equal(t, []string{"GO-2026-1 in github.com/valyala/fasthttp@v1.51.0 (github.com/valyala/fasthttp.parseChunkSize), fixed in v1.70.0"}, called)
	require.Equal(t, []string{"GO-2026-2 in stdlib@v1.26.8 (net/http.Read), fixed in v1.26.9"}, toolchain)
}
