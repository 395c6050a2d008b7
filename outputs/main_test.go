package outputs_test

import (
	"testing"

	"github.com/llorch/llorch/testenv"
)

// env is the package's real services (versitygw; Temporal unused).
// External package: testenv imports workflows, which import activities,
// which import outputs.
var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }
