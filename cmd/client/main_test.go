package main

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// serverDeadline bounds every in-test server's accept and I/O so that no
// goroutine can outlive a broken test for long.
const serverDeadline = 10 * time.Second

// serve starts a one-connection TCP server on 127.0.0.1:0 that runs handle
// on the accepted connection, and returns its address. The listener is
// closed and the goroutine waited for in t.Cleanup.
func serve(t *testing.T, handle func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tl := ln.(*net.TCPListener)
	if err := tl.SetDeadline(time.Now().Add(serverDeadline)); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := tl.AcceptTCP()
		if err != nil {
			return
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(serverDeadline)); err != nil {
			return
		}
		handle(c)
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// echoServer reads to EOF, echoes what it got (transformed by f, if not
// nil), half-closes and closes. The bytes it received are sent on got.
func echoServer(t *testing.T, f func([]byte) []byte, got chan<- []byte) string {
	return serve(t, func(c *net.TCPConn) {
		b, err := io.ReadAll(c)
		if got != nil {
			got <- b
		}
		if err != nil {
			return
		}
		if f != nil {
			b = f(b)
		}
		if _, err := c.Write(b); err != nil {
			return
		}
		c.CloseWrite()
	})
}

// freeAddr returns an address on which nothing is listening.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func runClient(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestEcho(t *testing.T) {
	got := make(chan []byte, 1)
	addr := echoServer(t, nil, got)
	code, stdout, stderr := runClient("-addr", addr, "-timeout", "5s")
	if code != 0 {
		t.Fatalf("exit %d, want 0; stderr:\n%s", code, stderr)
	}
	want := "Bytes Sent: 14\nBytes received: 14\nConnection closed\n"
	if stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", stdout, want)
	}
	if stderr != "" {
		t.Errorf("unexpected stderr: %q", stderr)
	}
	if b := <-got; string(b) != "this is a test" {
		t.Errorf("server received %q, want %q", b, "this is a test")
	}
}

func TestQuietJoinedMessage(t *testing.T) {
	got := make(chan []byte, 1)
	addr := echoServer(t, nil, got)
	code, stdout, stderr := runClient("-q", "-addr", addr, "-timeout", "5s", "hello,", "echo", "world")
	if code != 0 {
		t.Fatalf("exit %d, want 0; stderr:\n%s", code, stderr)
	}
	if stdout != "" || stderr != "" {
		t.Errorf("quiet run printed stdout %q, stderr %q", stdout, stderr)
	}
	if b := <-got; string(b) != "hello, echo world" {
		t.Errorf("server received %q, want %q", b, "hello, echo world")
	}
}

func TestReset(t *testing.T) {
	addr := serve(t, func(c *net.TCPConn) {
		buf := make([]byte, len(defaultMessage))
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		c.SetLinger(0) // Close sends RST instead of FIN.
	})
	code, stdout, stderr := runClient("-addr", addr, "-timeout", "5s")
	if code != 1 {
		t.Fatalf("exit %d, want 1; stdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if !strings.Contains(stderr, "reset") {
		t.Errorf("stderr %q does not mention the reset", stderr)
	}
	if strings.Contains(stdout, "Connection closed") {
		t.Errorf("stdout reports an orderly close after a reset:\n%s", stdout)
	}
}

func TestEchoMismatch(t *testing.T) {
	addr := echoServer(t, bytes.ToUpper, nil)
	code, _, stderr := runClient("-addr", addr, "-timeout", "5s")
	if code != 1 {
		t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr)
	}
	if !strings.Contains(stderr, "echo mismatch: sent 14 bytes, received 14 bytes") {
		t.Errorf("stderr %q lacks the mismatch report", stderr)
	}
	if !strings.Contains(stderr, `"THIS IS A TEST"`) {
		t.Errorf("stderr %q lacks the quoted excerpt", stderr)
	}
}

func TestEchoShort(t *testing.T) {
	addr := echoServer(t, func(b []byte) []byte { return b[:4] }, nil)
	code, _, stderr := runClient("-addr", addr, "-timeout", "5s")
	if code != 1 || !strings.Contains(stderr, "echo mismatch: sent 14 bytes, received 4 bytes") {
		t.Fatalf("exit %d, stderr %q; want 1 and a mismatch report", code, stderr)
	}
}

func TestTimeout(t *testing.T) {
	// The server reads to EOF but never echoes or closes; the client's
	// deadline must end the exchange.
	release := make(chan struct{})
	addr := serve(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		<-release
	})
	t.Cleanup(func() { close(release) }) // runs before serve's cleanup
	code, _, stderr := runClient("-addr", addr, "-timeout", "200ms")
	if code != 1 || !strings.Contains(stderr, "timed out") {
		t.Fatalf("exit %d, stderr %q; want 1 and a timeout report", code, stderr)
	}
}

func TestBadFlag(t *testing.T) {
	code, _, stderr := runClient("-nosuchflag")
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	if !strings.Contains(stderr, usageLine) {
		t.Errorf("stderr %q lacks the usage line", stderr)
	}
	if code, _, _ := runClient("-timeout", "0s"); code != 2 {
		t.Errorf("-timeout 0s: exit %d, want 2", code)
	}
}

func TestDialFailure(t *testing.T) {
	code, stdout, stderr := runClient("-addr", freeAddr(t), "-timeout", "5s")
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if stdout != "" {
		t.Errorf("unexpected stdout %q", stdout)
	}
	if stderr == "" || strings.Count(stderr, "\n") != 1 {
		t.Errorf("stderr %q is not a one-line error", stderr)
	}
}

func TestDiffExcerpt(t *testing.T) {
	for _, tc := range []struct{ sent, got, want string }{
		{"abc", "abd", `; first difference at byte 2: sent "c", received "d"`},
		{"abc", "ab", `; first difference at byte 2: sent "c", received (end)`},
		{"ab", "abc", `; first difference at byte 2: sent (end), received "c"`},
		{"x", "0123456789abcdefXYZ", `; first difference at byte 0: sent "x", received "0123456789abcdef"...`},
	} {
		if got := diffExcerpt([]byte(tc.sent), []byte(tc.got)); got != tc.want {
			t.Errorf("diffExcerpt(%q, %q) = %s, want %s", tc.sent, tc.got, got, tc.want)
		}
	}
}
