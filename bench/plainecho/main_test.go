package main

import (
	"github.com/sockfsm/sockfsm/internal/testutil"
	"io"
	"net"
	"os"
	"regexp"
	"syscall"
	"testing"
	"time"
)

// testDeadline bounds every wait here. It is a bound, not a timing assertion.
const testDeadline = 10 * time.Second

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer = testutil.SyncBuffer

func TestRefusesNonLoopback(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0", "example.com:0"} {
		if code := run([]string{"-addr", addr}, io.Discard, nil); code != 2 {
			t.Errorf("-addr %s: exit %d, want 2", addr, code)
		}
	}
}

// TestServeAndShutdown: echo, then SIGTERM: the idle connection gets the
// server's FIN, and the server exits 0.
func TestServeAndShutdown(t *testing.T) {
	var stderr syncBuffer
	sigs := make(chan os.Signal, 1)
	exit := make(chan int, 1)
	go func() { exit <- run([]string{"-addr", "127.0.0.1:0"}, &stderr, sigs) }()

	listening := regexp.MustCompile(`msg=listening addr=(\S+)`)
	var addr string
	for deadline := time.Now().Add(testDeadline); addr == ""; time.Sleep(5 * time.Millisecond) {
		if m := listening.FindStringSubmatch(stderr.String()); m != nil {
			addr = m[1]
		} else if time.Now().After(deadline) {
			t.Fatalf("no listening line in %q", stderr.String())
		}
	}
	c, err := net.DialTimeout("tcp", addr, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(testDeadline))
	buf := make([]byte, 14)
	if _, err := c.Write([]byte("this is a test")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "this is a test" {
		t.Fatalf("echo %q, %v", buf, err)
	}

	sigs <- syscall.SIGTERM
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("after SIGTERM: %d bytes, %v; want the server's FIN", n, err)
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d, want 0; log:\n%s", code, stderr.String())
		}
	case <-time.After(testDeadline):
		t.Fatal("the server did not exit after SIGTERM")
	}
}
