package sockcall

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

// socketPair returns a connected Unix stream pair, closed at the test's
// end unless closed before.
func socketPair(t *testing.T, flags int) (a, b int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|flags, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return fds[0], fds[1]
}

// TestRecvSend: on a non-blocking stream socket pair, Send and Recv move
// bytes as write and read do, return a partial count when the buffer
// fills, report EAGAIN and EPIPE as the errno values the loop compares
// against, with -1, and the peer's close as 0 and no error.
func TestRecvSend(t *testing.T) {
	a, b := socketPair(t, unix.SOCK_NONBLOCK)
	buf := make([]byte, 64)
	if n, err := Recv(b, buf, 0); n != -1 || err != unix.EAGAIN {
		t.Fatalf("Recv on an empty socket = %d, %v; want -1, EAGAIN", n, err)
	}
	if n, err := Send(a, nil, unix.MSG_NOSIGNAL); n != 0 || err != nil {
		t.Fatalf("Send(nil) = %d, %v; want 0, nil", n, err)
	}
	if n, err := Send(a, []byte("hello"), unix.MSG_NOSIGNAL); n != 5 || err != nil {
		t.Fatalf("Send = %d, %v; want 5, nil", n, err)
	}
	if n, err := Recv(b, buf, 0); n != 5 || err != nil || !bytes.Equal(buf[:n], []byte("hello")) {
		t.Fatalf("Recv = %d %q, %v; want 5 \"hello\", nil", n, buf[:max(n, 0)], err)
	}
	// Fill b's receive side: a large send is cut short, then refused.
	big := make([]byte, 1<<22)
	sent, err := Send(a, big, unix.MSG_NOSIGNAL)
	if sent <= 0 || sent >= len(big) || err != nil {
		t.Fatalf("Send(4 MiB) = %d, %v; want a partial count", sent, err)
	}
	if n, err := Send(a, big, unix.MSG_NOSIGNAL); n != -1 || err != unix.EAGAIN {
		t.Fatalf("Send to a full socket = %d, %v; want -1, EAGAIN", n, err)
	}
	unix.Close(b)
	if n, err := Send(a, []byte("x"), unix.MSG_NOSIGNAL); n != -1 || err != unix.EPIPE {
		t.Fatalf("Send after the peer's close = %d, %v; want -1, EPIPE", n, err)
	}

	c, d := socketPair(t, unix.SOCK_NONBLOCK)
	unix.Close(c)
	if n, err := Recv(d, buf, 0); n != 0 || err != nil {
		t.Fatalf("Recv after the peer's close = %d, %v; want 0, nil (EOF)", n, err)
	}
}

// TestDontWait: with MSG_DONTWAIT, neither call blocks on a socket in
// blocking mode (the loop passes it, in case a prelude's net.Conn, which
// shares the socket's file description, left it so).
func TestDontWait(t *testing.T) {
	a, b := socketPair(t, 0) // blocking
	buf := make([]byte, 64)
	if n, err := Recv(b, buf, unix.MSG_DONTWAIT); n != -1 || err != unix.EAGAIN {
		t.Fatalf("Recv(MSG_DONTWAIT) on an empty blocking socket = %d, %v; want -1, EAGAIN", n, err)
	}
	big := make([]byte, 1<<22)
	if n, err := Send(a, big, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL); n <= 0 || n >= len(big) || err != nil {
		t.Fatalf("Send(4 MiB, MSG_DONTWAIT) on a blocking socket = %d, %v; want a partial count", n, err)
	}
}
