package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/internal/testutil"
)

// testDeadline bounds every wait here. It is a bound, not a timing assertion.
const testDeadline = 10 * time.Second

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-addr", "0.0.0.0:0"}, {"-addr", ":0"}, {"-addr", "192.0.2.1:0"}, {"-addr", "example.com:0"},
		{"-buffer", "0"}, {"extra"}, {"-nope"},
	} {
		if code := run(args, io.Discard, nil); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	if code := run([]string{"-h"}, io.Discard, nil); code != 0 {
		t.Errorf("-h: exit %d, want 0", code)
	}
}

// start runs the server on 127.0.0.1:0 with a small buffer; it returns the
// address, the signal channel and the exit code's channel.
func start(t *testing.T, stderr *testutil.SyncBuffer) (string, chan os.Signal, chan int) {
	t.Helper()
	sigs := make(chan os.Signal, 1)
	exit := make(chan int, 1)
	go func() { exit <- run([]string{"-addr", "127.0.0.1:0", "-buffer", "7"}, stderr, sigs) }()
	listening := regexp.MustCompile(`msg=listening addr=(\S+)`)
	for deadline := time.Now().Add(testDeadline); ; time.Sleep(5 * time.Millisecond) {
		if m := listening.FindStringSubmatch(stderr.String()); m != nil {
			return m[1], sigs, exit
		}
		if time.Now().After(deadline) {
			t.Fatalf("no listening line in %q", stderr.String())
		}
	}
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(testDeadline))
	return c.(*net.TCPConn)
}

func stop(t *testing.T, sigs chan os.Signal, exit chan int, stderr *testutil.SyncBuffer) {
	t.Helper()
	sigs <- syscall.SIGTERM
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d, want 0; log:\n%s", code, stderr.String())
		}
	case <-time.After(testDeadline):
		t.Fatal("the server did not exit after SIGTERM")
	}
}

// TestEchoThenFIN: the tutorial's client, with a message longer than the
// buffer: the whole echo, then the server's FIN after ours.
func TestEchoThenFIN(t *testing.T) {
	var stderr testutil.SyncBuffer
	addr, sigs, exit := start(t, &stderr)
	c := dial(t, addr)
	defer c.Close()
	msg := bytes.Repeat([]byte("this is a test "), 100)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes: %d bytes, %v", len(msg), len(got), err)
	}
	stop(t, sigs, exit, &stderr)
}

// TestShutdownClosesIdle: SIGTERM closes an idle connection with a FIN,
// and the server exits 0.
func TestShutdownClosesIdle(t *testing.T) {
	var stderr testutil.SyncBuffer
	addr, sigs, exit := start(t, &stderr)
	c := dial(t, addr)
	defer c.Close()
	var b [1]byte
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'x' {
		t.Fatalf("ping: %q, %v", b, err)
	}
	stop(t, sigs, exit, &stderr)
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("after SIGTERM: %d bytes, %v; want the server's FIN", n, err)
	}
}
