// Package conntest is the client side of sockfsm's real-socket tests,
// shared by the root package's tests, the loop driver's and the drivers'
// suite (internal/drivertest): writing, half-closing, reading to the
// server's FIN or its RST, the checks of a CloseInfo, and the handlers
// those tests serve. Every wait it makes is bounded by Deadline; none is a
// timing assertion.
package conntest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// Deadline bounds every client socket's I/O and every wait. It is a bound,
// not a timing assertion.
const Deadline = 10 * time.Second

// Always returns a NewHandler that serves every connection with h.
func Always(h sockfsm.Handler) func(sockfsm.ConnInfo) sockfsm.Handler {
	return func(sockfsm.ConnInfo) sockfsm.Handler { return h }
}

// AddrKey is the recorders' key of a connection's address: its string,
// "" for none.
func AddrKey(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// Key is the recorders' key of client c's connection: the client's local
// address, which is the server's RemoteAddr.
func Key(c net.Conn) string { return AddrKey(c.LocalAddr()) }

// MustWrite writes p on c; an error fails the test.
func MustWrite(t *testing.T, c net.Conn, p []byte) {
	t.Helper()
	if _, err := c.Write(p); err != nil {
		t.Fatalf("client Write(%d bytes): %v", len(p), err)
	}
}

// CloseWrite half-closes c (its FIN); an error, or a c that cannot, fails
// the test.
func CloseWrite(t *testing.T, c net.Conn) {
	t.Helper()
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatalf("%T has no CloseWrite", c)
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatalf("client CloseWrite: %v", err)
	}
}

// ReadFull reads exactly n bytes from c; anything less fails the test.
func ReadFull(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if m, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("client read %d of %d bytes: %v (reset: %v)", m, n, err, IsReset(err))
	}
	return b
}

// ReadToEOF reads until the server's FIN: a reset, or any other error,
// fails the test.
func ReadToEOF(t *testing.T, c net.Conn) []byte {
	t.Helper()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("client read: %v (reset: %v) after %d bytes; want the server's FIN (io.EOF)", err, IsReset(err), len(b))
	}
	return b
}

// Drain reads and discards until an error and returns it with the count of
// bytes read. If want is not nil, the bytes read must be a prefix of it.
func Drain(c net.Conn, want []byte) (int, error) {
	buf := make([]byte, 64<<10)
	n := 0
	for {
		m, err := c.Read(buf)
		if want != nil && (n+m > len(want) || !bytes.Equal(buf[:m], want[n:n+m])) {
			return n, fmt.Errorf("bytes %d..%d are not the server's output", n, n+m)
		}
		n += m
		if err != nil {
			return n, err
		}
	}
}

// IsReset reports whether a read's error is the server's RST.
func IsReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// WantReset reads and discards until an error, which must be the server's
// RST; what was read must be a prefix of want (nil: anything).
func WantReset(t *testing.T, c net.Conn, want []byte) {
	t.Helper()
	n, err := Drain(c, want)
	if !IsReset(err) {
		t.Fatalf("client read: %v after %d bytes; want ECONNRESET (the server's RST)", err, n)
	}
}

// WaitUntil polls cond until it holds, for at most Deadline.
func WaitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Deadline)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Recv receives a value from ch, waiting at most Deadline.
func Recv[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(Deadline):
		t.Fatalf("gave up waiting for %s", what)
		var zero T
		return zero
	}
}

// Pattern returns n bytes that are not periodic in any power of two, so
// that a lost, repeated or reordered piece of it shows; seed makes two
// streams differ.
func Pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

// BigHandler answers input that starts with "big" with resp, all queued in
// one Write (MaxPendingOutput must hold it, so that queueing it takes
// little of WriteTimeout), and echoes any other input.
func BigHandler(resp []byte) sockfsm.Handler {
	return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
		if bytes.HasPrefix(p, []byte("big")) {
			c.Write(resp)
			return
		}
		c.Write(p)
	})
}

// GatedEcho returns a NewHandler whose echo handlers wait in OnOpen until
// release is called, or Deadline passes, and release. A test sends its
// whole request, and its FIN, then releases: the server's first read finds
// all of it in the socket. release is idempotent and is called at the
// test's cleanup too, so that a failure before it does not hold the
// server.
func GatedEcho(t *testing.T) (newHandler func(sockfsm.ConnInfo) sockfsm.Handler, release func()) {
	sent := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(sent) }) }
	t.Cleanup(release)
	return Always(openGate{sent: sent}), release
}

// openGate is GatedEcho's handler.
type openGate struct {
	sockfsm.Echo
	sent <-chan struct{}
}

func (h openGate) OnOpen(*sockfsm.Conn) {
	select {
	case <-h.sent:
	case <-time.After(Deadline):
	}
}

// WantInfo is what CheckInfo expects of a CloseInfo.
type WantInfo struct {
	Reason                  sockfsm.Reason
	Linger                  sockfsm.LingerEnd
	PeerFIN                 bool
	Aborted                 bool
	Err                     error // errors.Is(got.Err, Err); nil: got.Err must be nil
	BytesRead, BytesWritten int64 // -1: not checked
}

// CheckInfo compares got with want, field by field (the byte counts when
// want's are not negative).
func CheckInfo(t *testing.T, got sockfsm.CloseInfo, want WantInfo) {
	t.Helper()
	if got.Reason != want.Reason {
		t.Errorf("CloseInfo.Reason = %s, want %s (err %v)", got.Reason, want.Reason, got.Err)
	}
	if got.Linger != want.Linger {
		t.Errorf("CloseInfo.Linger = %s, want %s", got.Linger, want.Linger)
	}
	if got.PeerFIN != want.PeerFIN {
		t.Errorf("CloseInfo.PeerFIN = %v, want %v", got.PeerFIN, want.PeerFIN)
	}
	if got.Aborted() != want.Aborted {
		t.Errorf("CloseInfo.Aborted() = %v, want %v", got.Aborted(), want.Aborted)
	}
	if want.Err == nil && got.Err != nil {
		t.Errorf("CloseInfo.Err = %v, want nil", got.Err)
	}
	if want.Err != nil && !errors.Is(got.Err, want.Err) {
		t.Errorf("CloseInfo.Err = %v, want an error matching %v", got.Err, want.Err)
	}
	if want.BytesRead >= 0 && got.BytesRead != want.BytesRead {
		t.Errorf("CloseInfo.BytesRead = %d, want %d", got.BytesRead, want.BytesRead)
	}
	if want.BytesWritten >= 0 && got.BytesWritten != want.BytesWritten {
		t.Errorf("CloseInfo.BytesWritten = %d, want %d", got.BytesWritten, want.BytesWritten)
	}
}
