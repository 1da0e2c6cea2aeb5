package transport

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/nettest"
)

func TestPipeNettest(t *testing.T) {
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		a, b := Pipe()
		return a, b, func() { a.Close(); b.Close() }, nil
	})
}

func TestPipeAddr(t *testing.T) {
	a, b := Pipe()
	defer a.Close()
	defer b.Close()
	for _, tc := range []struct {
		addr net.Addr
		want string
	}{
		{a.LocalAddr(), "pipe:1"},
		{a.RemoteAddr(), "pipe:2"},
		{b.LocalAddr(), "pipe:2"},
		{b.RemoteAddr(), "pipe:1"},
	} {
		if tc.addr.Network() != "pipe" || tc.addr.String() != tc.want {
			t.Errorf("addr = %s:%s, want pipe:%s", tc.addr.Network(), tc.addr, tc.want)
		}
	}
}

func TestPipeCloseWrite(t *testing.T) {
	a, b := Pipe()
	defer a.Close()
	defer b.Close()
	guard(t, a, b)

	mustWrite(t, a, "request")
	if err := a.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	_, err := a.Write([]byte("late"))
	wantIs(t, "Write after CloseWrite", err, ErrWriteAfterShutdown)

	if got := readAll(t, b); got != "request" {
		t.Fatalf("peer read %q, want %q", got, "request")
	}
	wantEOF(t, b)

	// The other direction still works, including its own half-close.
	mustWrite(t, b, "response")
	if err := b.CloseWrite(); err != nil {
		t.Fatalf("peer CloseWrite: %v", err)
	}
	if got := readAll(t, a); got != "response" {
		t.Fatalf("read %q, want %q", got, "response")
	}
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("peer Close: %v", err)
	}
}

func TestPipeCloseWithUnreadInputResetsPeer(t *testing.T) {
	a, b := Pipe()
	defer a.Close()
	guard(t, a, b)

	mustWrite(t, a, "request")  // b never reads it
	mustWrite(t, b, "response") // lost when b resets a
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	n, err := a.Read(make([]byte, 64))
	if n != 0 {
		t.Errorf("peer read %d bytes after reset, want 0", n)
	}
	wantIs(t, "peer Read", err, syscall.ECONNRESET)
	_, err = a.Write([]byte("x"))
	wantIs(t, "peer Write", err, syscall.ECONNRESET)

	_, err = b.Read(make([]byte, 1))
	wantIs(t, "Read after Close", err, net.ErrClosed)
	wantIs(t, "second Close", b.Close(), net.ErrClosed)
}

func TestPipeCloseWithoutUnreadInputIsFIN(t *testing.T) {
	a, b := Pipe()
	defer b.Close()
	guard(t, a, b)

	mustWrite(t, a, "data")
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := readAll(t, b); got != "data" {
		t.Fatalf("peer read %q, want %q", got, "data")
	}
	_, err := b.Write([]byte("x"))
	wantIs(t, "peer Write", err, syscall.EPIPE)

	_, err = a.Write([]byte("x"))
	wantIs(t, "Write after Close", err, net.ErrClosed)
	_, err = a.Read(make([]byte, 1))
	wantIs(t, "Read after Close", err, net.ErrClosed)
	wantIs(t, "SetDeadline after Close", a.SetDeadline(time.Time{}), net.ErrClosed)
}

func TestPipeAbortResetsPeer(t *testing.T) {
	a, b := Pipe()
	defer b.Close()
	guard(t, a, b)

	mustWrite(t, a, "data") // b has not read it: Abort discards it
	if err := a.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	n, err := b.Read(make([]byte, 64))
	if n != 0 {
		t.Errorf("peer read %d bytes after reset, want 0", n)
	}
	wantIs(t, "peer Read", err, syscall.ECONNRESET)
	_, err = b.Write([]byte("x"))
	wantIs(t, "peer Write", err, syscall.ECONNRESET)

	wantIs(t, "Abort after Abort", a.Abort(), net.ErrClosed)
	wantIs(t, "Close after Abort", a.Close(), net.ErrClosed)
	wantIs(t, "CloseWrite after Abort", a.CloseWrite(), net.ErrClosed)
}

func TestPipeWriteBlocksWhenFull(t *testing.T) {
	const size = 16
	a, b := PipeSize(size)
	defer a.Close()
	defer b.Close()
	guard(t, b)

	msg := bytes.Repeat([]byte("0123456789"), 4)
	if err := a.SetWriteDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	n, err := a.Write(msg)
	if n != size {
		t.Errorf("Write into a full pipe wrote %d bytes, want %d", n, size)
	}
	wantIs(t, "Write", err, os.ErrDeadlineExceeded)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("Write error %v is not a net.Error with Timeout() true", err)
	}

	// The rest goes through once the reader drains the buffer.
	guard(t, a)
	done := make(chan error, 1)
	go func() {
		_, err := a.Write(msg[n:])
		done <- err
	}()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(b, got); err != nil {
		t.Fatalf("ReadFull: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("blocked Write: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("read %q, want %q", got, msg)
	}
}

func TestPipeCloseUnblocks(t *testing.T) {
	a, b := PipeSize(1)
	defer b.Close()
	guard(t, a, b)

	done := make(chan error, 2)
	go func() {
		_, err := a.Read(make([]byte, 1))
		done <- err
	}()
	go func() {
		_, err := a.Write([]byte("more than fits"))
		done <- err
	}()
	// Close may come before either call starts; both must fail either way.
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for range 2 {
		wantIs(t, "blocked call", <-done, net.ErrClosed)
	}
}

func TestPipeSizePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("PipeSize(0) did not panic")
		}
	}()
	PipeSize(0)
}
