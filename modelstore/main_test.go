package modelstore_test

import (
	"testing"

	"github.com/llorch/llorch/testenv"
)

// env is the package's real services (Temporal, versitygw), shared by the
// test files of package modelstore_test. Keep the one TestMain of the test
// binary here. External package: testenv imports workflows, which imports
// modelstore, so an in-package test cannot import testenv.
var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }
