package loop

import (
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every loop
// and Serve call must have returned.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fdSettle bounds how long checkFDs waits for the test's descriptors to be
// closed: a bound, not a timing assertion.
const fdSettle = 2 * time.Second

var initPoller sync.Once

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents)
}

// checkFDs fails the test if, once its cleanups have run (they shut its
// servers down and close its clients), more descriptors are open than at
// its start: a socket, an epoll instance or an eventfd leaked.
func checkFDs(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		return
	}
	initPoller.Do(func() {
		if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
			ln.Close()
		}
	})
	base := openFDs(t)
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
