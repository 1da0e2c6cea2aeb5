package main

import (
	"fmt"
	"io"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// TestSecondSignal: the real server process, in a graceful shutdown that
// would last an hour, gets a second signal: it closes every connection at
// once (RST) and exits 0.
//
// One client echoes, then the server gets SIGTERM: it half-closes the idle
// connection (the client reads EOF) and lingers for the client's FIN, which
// never comes; -shutdown-timeout, -linger-timeout and -linger-time are an
// hour. Then SIGINT, the other signal the server handles: the connection
// must be reset and the process must exit. Ignored, the second signal
// leaves the process running, and the test fails at its wait's bound.
func TestSecondSignal(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no SIGTERM on Windows")
	}
	bin := buildServer(t)
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0", "-v",
		"-shutdown-timeout", "1h", "-linger-timeout", "1h", "-linger-time", "1h")
	var story, logs syncBuffer
	addrc, logsDone, exited := startProcess(t, cmd, &story, &logs)
	hasExited := false
	defer func() {
		if !hasExited {
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("server log:\n%s\nstory:\n%s", logs.String(), story.String())
		}
	}()

	var addr string
	select {
	case addr = <-addrc:
	case <-logsDone:
		t.Fatal("the server exited before listening")
	case <-time.After(deadline):
		t.Fatal("the server did not log its address")
	}
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("reading the echo: %v", err)
	}

	// The first signal: a graceful shutdown, under way once the client has
	// the server's FIN.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("after SIGTERM: %d bytes, %v; want the server's FIN", n, err)
	}

	// The second signal.
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatalf("SIGINT: %v", err)
	}
	select {
	case err := <-exited:
		hasExited = true
		if err != nil {
			t.Errorf("the server exited with %v, want 0", err)
		}
	case <-time.After(deadline):
		t.Fatal("the server did not exit after the second signal")
	}

	// The connection was reset. The client had the FIN already: its kernel
	// reports the RST as EPIPE (Linux) or ECONNRESET, to a read or a write.
	_, rerr := c.Read(make([]byte, 1))
	if !isReset(rerr) {
		if _, werr := c.Write([]byte("y")); !isReset(werr) {
			t.Errorf("after the second signal: read %v, write %v; want a reset", rerr, werr)
		}
	}
	want := fmt.Sprintf("Connection aborted (RST): reason %s", sockfsm.ReasonShutdownDeadline)
	if !strings.Contains(story.String(), want) {
		t.Errorf("the story lacks %q", want)
	}
	if !strings.Contains(logs.String(), `msg="closing every connection" signal=interrupt`) {
		t.Errorf("the log lacks the second signal's %q", "closing every connection")
	}
}
