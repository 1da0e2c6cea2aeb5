//go:build race

package sockcall

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRaceSeesTheBuffers: under -race, Recv and Send tell the race detector
// which bytes the kernel wrote and read, as unix.Read and unix.Write do, so
// a buffer used by another goroutine without synchronization while the
// kernel fills or sends it is reported: in the loop, a handler that keeps
// OnData's bytes past the call, or changes bytes being written. The races
// are made in a child process, which the detector fails; the test reads
// its report.
func TestRaceSeesTheBuffers(t *testing.T) {
	if os.Getenv("SOCKCALL_RACE_CHILD") == "1" {
		racyBuffers()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestRaceSeesTheBuffers$", "-test.count=1")
	cmd.Env = append(os.Environ(), "SOCKCALL_RACE_CHILD=1")
	out, _ := cmd.CombinedOutput()
	if n := strings.Count(string(out), "WARNING: DATA RACE"); n != 2 {
		t.Fatalf("%d races reported, want 2 (a Recv into a buffer another goroutine reads, a Send of one another goroutine writes); the child's output:\n%s", n, out)
	}
}

// racyBuffers makes the two races: each buffer is touched by a goroutine
// and, with nothing ordering the two, by the kernel through Recv or Send.
func racyBuffers() {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		panic(err)
	}
	a, b := fds[0], fds[1]
	in, out := make([]byte, 8), make([]byte, 8)
	done := make(chan byte)
	go func() {
		x := in[0] // read as the kernel fills it
		out[0] = 1 // written as the kernel sends it
		done <- x
	}()
	// Nothing orders the goroutine's accesses and the calls' below, in
	// whichever order they run: the detector reports both.
	if _, err := Send(a, out, 0); err != nil {
		panic(err)
	}
	if _, err := Recv(b, in, 0); err != nil {
		panic(err)
	}
	<-done
}
