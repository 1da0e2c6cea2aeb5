package loop

import (
	"testing"

	"github.com/sockfsm/sockfsm/internal/testutil"
	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every loop
// and Serve call must have returned.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// checkFDs fails the test if it leaks a descriptor (testutil.CheckFDs).
func checkFDs(t *testing.T) { t.Helper(); testutil.CheckFDs(t) }
