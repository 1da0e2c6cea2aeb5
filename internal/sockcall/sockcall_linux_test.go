package sockcall

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRecvSend: on a non-blocking stream socket pair, Send and Recv move
// bytes as write and read do, return a partial count when the buffer
// fills, and report EAGAIN and EPIPE as the errno values the loop compares
// against, with -1.
func TestRecvSend(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := fds[0], fds[1]
	defer unix.Close(a)
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
}
