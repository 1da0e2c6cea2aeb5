package sockfsm_test

import (
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every
// connection goroutine, Serve loop and ServeConn call must have ended.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fdSettle bounds how long checkFDs waits, at the end of a test, for the
// descriptors the test opened to be closed. It is a bound, not a timing
// assertion: closes that are merely slow still pass.
const fdSettle = 2 * time.Second

// initPoller makes the runtime open the descriptors it keeps for the life of
// the process (the network poller's epoll instance and its wake-up event)
// before any baseline is taken, so that the first network test does not
// count them as leaked.
var initPoller sync.Once

// openFDs returns the number of open file descriptors of the process.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents)
}

// checkFDs records the number of open file descriptors now and, when the
// test ends (after the test's other cleanups, which close its sockets and
// shut its servers down), waits up to fdSettle for the count to come back to
// that baseline; it fails the test if it does not: a socket was leaked.
// Skipped where /proc/self/fd does not exist (non-Linux).
func checkFDs(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		return
	}
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		return
	}
	initPoller.Do(func() {
		if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
			ln.Close()
		}
	})
	base := openFDs(t)
	// Registered first, so it runs last.
	t.Cleanup(func() {
		deadline := time.Now().Add(fdSettle)
		n := openFDs(t)
		for n > base && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			n = openFDs(t)
		}
		if n > base {
			t.Errorf("file descriptors leaked: %d open at the start of the test, %d at the end", base, n)
		}
	})
}
