package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testDeadline bounds every wait here. It is a bound, not a timing assertion.
const testDeadline = 10 * time.Second

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-addr", "0.0.0.0:0"}, {"-addr", ":0"}, {"-addr", "192.0.2.1:0"}, {"-addr", "example.com:0"},
		{"-loops", "0"}, {"-shutdown-timeout", "0s"}, {"extra"}, {"-nope"},
	} {
		if code := run(args, io.Discard, nil); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

// TestEcho: over loopback, two connections get their echo (one message
// larger than a socket read), a half-close gets the echo and then gnet's
// FIN, and SIGTERM closes an idle connection with a FIN and stops the
// server.
func TestEcho(t *testing.T) {
	var stderr syncBuffer
	sigs := make(chan os.Signal, 1)
	exit := make(chan int, 1)
	go func() { exit <- run([]string{"-addr", "127.0.0.1:0", "-loops", "2"}, &stderr, sigs) }()
	listening := regexp.MustCompile(`msg=listening addr=(\S+)`)
	var addr string
	for deadline := time.Now().Add(testDeadline); addr == ""; time.Sleep(5 * time.Millisecond) {
		if m := listening.FindStringSubmatch(stderr.String()); m != nil {
			addr = m[1]
		} else if time.Now().After(deadline) {
			t.Fatalf("no listening line in %q", stderr.String())
		}
	}
	dial := func() *net.TCPConn {
		c, err := net.DialTimeout("tcp", addr, testDeadline)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(testDeadline))
		return c.(*net.TCPConn)
	}

	idle := dial()
	defer idle.Close()
	if _, err := idle.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(idle, b[:]); err != nil || b[0] != 'x' {
		t.Fatalf("ping: %q, %v", b, err)
	}

	c := dial()
	defer c.Close()
	msg := []byte(strings.Repeat("this is a test ", 20000)) // 300 KB
	written := make(chan error, 1)
	go func() { _, err := c.Write(msg); written <- err }()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes: %v", len(msg), err)
	}
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("after our FIN: %d bytes, %v; want gnet's FIN", n, err)
	}

	sigs <- syscall.SIGTERM
	if n, err := io.Copy(io.Discard, idle); n != 0 || err != nil {
		t.Fatalf("after SIGTERM: %d bytes, %v; want gnet's FIN", n, err)
	}
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d, want 0; log:\n%s", code, stderr.String())
		}
	case <-time.After(testDeadline):
		t.Fatal("the server did not exit after SIGTERM")
	}
}
