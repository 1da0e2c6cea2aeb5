package testutil

import (
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"
)

// FDSettle bounds how long CheckFDs waits, at the end of a test, for the
// test's descriptors to be closed: a bound, not a timing assertion.
const FDSettle = 2 * time.Second

// initPoller makes the runtime open the descriptors it keeps for the life
// of the process (the network poller's epoll instance and its wake-up
// event) before any baseline is taken, so that the first network test does
// not count them as leaked.
var initPoller sync.Once

// OpenFDs returns the number of open file descriptors of the process.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents)
}

// CheckFDs records the number of open file descriptors now and, when the
// test ends (after the test's other cleanups, which close its sockets and
// shut its servers down), waits up to FDSettle for the count to come back
// to that baseline; it fails the test if it does not: a socket, an epoll
// instance or an eventfd was leaked. Skipped where /proc/self/fd does not
// exist (non-Linux). Call it first in a test, so that its cleanup runs
// last.
func CheckFDs(t *testing.T) {
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
	base := OpenFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(FDSettle)
		n := OpenFDs(t)
		for n > base && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			n = OpenFDs(t)
		}
		if n > base {
			t.Errorf("file descriptors leaked: %d open at the start of the test, %d at the end", base, n)
		}
	})
}
