//go:build unix

package transport

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// lazyPairs runs f over each kind of connection whose adapter is a
// LazyReader: TCP on 127.0.0.1 and ::1, and Unix sockets. lazy is the
// adapter of one end, peer the other end.
func lazyPairs(t *testing.T, f func(t *testing.T, lazy LazyReader, lazyConn Stream, peer net.Conn)) {
	forEachLoopback(t, func(t *testing.T, host string) {
		client, server := tcpPair(t, host)
		c := TCP(server)
		f(t, c.(LazyReader), c, client)
	})
	t.Run("Unix", func(t *testing.T) {
		client, server := unixPair(t)
		c := Unix(server)
		f(t, c.(LazyReader), c, client)
	})
}

// waitBorrowed waits, bounded, until bufs has n buffers lent out.
func waitBorrowed(t *testing.T, bufs *Buffers, n int64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); bufs.Borrowed() != n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d buffers borrowed, want %d", bufs.Borrowed(), n)
		}
	}
}

// TestReadLazy: input arrives in order and whole; while ReadLazy waits for
// input it holds no buffer; a read that finds input at once keeps the one it
// holds; the peer's FIN is io.EOF; ReleaseBuffer gives the buffer back.
func TestReadLazy(t *testing.T) {
	lazyPairs(t, func(t *testing.T, r LazyReader, _ Stream, peer net.Conn) {
		bufs := NewBuffers(4)

		// More input than one buffer: it comes in order, 4 bytes at a time.
		mustWrite(t, peer, "0123456789")
		var got []byte
		for len(got) < 10 {
			p, err := r.ReadLazy(bufs)
			if err != nil {
				t.Fatalf("ReadLazy after %q: %v", got, err)
			}
			if len(p) > bufs.Size() {
				t.Fatalf("ReadLazy returned %d bytes, more than the buffer's %d", len(p), bufs.Size())
			}
			if cap(p) != len(p) {
				t.Fatalf("ReadLazy returned %d bytes with capacity %d: the rest of a shared buffer shows", len(p), cap(p))
			}
			got = append(got, p...)
		}
		if string(got) != "0123456789" {
			t.Fatalf("read %q, want %q", got, "0123456789")
		}
		if n := bufs.Borrowed(); n != 1 {
			t.Fatalf("after reads that found input, %d buffers borrowed, want 1 (kept for the next read)", n)
		}

		// Nothing to read: ReadLazy gives its buffer back while it waits.
		type result struct {
			p   string
			err error
		}
		done := make(chan result, 1)
		go func() {
			p, err := r.ReadLazy(bufs)
			done <- result{string(p), err}
		}()
		waitBorrowed(t, bufs, 0)
		select {
		case res := <-done:
			t.Fatalf("ReadLazy returned %q, %v with no input", res.p, res.err)
		default:
		}
		mustWrite(t, peer, "late")
		if res := <-done; res.err != nil || res.p != "late" {
			t.Fatalf("ReadLazy = %q, %v; want %q, nil", res.p, res.err, "late")
		}

		if err := peer.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			t.Fatalf("peer CloseWrite: %v", err)
		}
		if p, err := r.ReadLazy(bufs); err != io.EOF || len(p) != 0 {
			t.Fatalf("ReadLazy after the peer's FIN = %q, %v; want io.EOF", p, err)
		}
		r.ReleaseBuffer()
		if n := bufs.Borrowed(); n != 0 {
			t.Fatalf("after ReleaseBuffer, %d buffers borrowed, want 0", n)
		}
		r.ReleaseBuffer() // twice is harmless
		if n := bufs.Borrowed(); n != 0 {
			t.Fatalf("after a second ReleaseBuffer, %d buffers borrowed, want 0", n)
		}
	})
}

// TestReadLazyErrors: a deadline, a deadline that moves while ReadLazy
// waits, the peer's reset and a closed connection are reported as Read
// reports them, and none leaves a buffer borrowed.
func TestReadLazyErrors(t *testing.T) {
	lazyPairs(t, func(t *testing.T, r LazyReader, c Stream, peer net.Conn) {
		bufs := NewBuffers(64)

		c.SetReadDeadline(time.Now().Add(-time.Second))
		_, err := r.ReadLazy(bufs)
		wantIs(t, "ReadLazy past its deadline", err, os.ErrDeadlineExceeded)
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("ReadLazy past its deadline: %v is not a net.Error with Timeout()", err)
		}

		// A deadline set while ReadLazy waits wakes it, as it wakes Read:
		// the engine's driver relies on this to shut a connection down.
		// A first read that finds input keeps its buffer, so that the
		// buffer's return shows that the second one is waiting.
		c.SetReadDeadline(time.Time{})
		mustWrite(t, peer, "x")
		if p, err := r.ReadLazy(bufs); err != nil || string(p) != "x" {
			t.Fatalf("ReadLazy = %q, %v; want %q", p, err, "x")
		}
		if n := bufs.Borrowed(); n != 1 {
			t.Fatalf("after a read that found input, %d buffers borrowed, want 1", n)
		}
		done := make(chan error, 1)
		go func() {
			_, err := r.ReadLazy(bufs)
			done <- err
		}()
		waitBorrowed(t, bufs, 0)
		c.SetReadDeadline(time.Unix(1, 0))
		wantIs(t, "ReadLazy woken by a deadline", <-done, os.ErrDeadlineExceeded)
		if n := bufs.Borrowed(); n != 0 {
			t.Fatalf("after timeouts, %d buffers borrowed, want 0", n)
		}
		c.SetReadDeadline(time.Time{})

		if tc, ok := peer.(*net.TCPConn); ok {
			// The peer aborts: RST.
			tc.SetLinger(0)
			tc.Close()
			guard(t, c)
			_, err := r.ReadLazy(bufs)
			wantIs(t, "ReadLazy after the peer's RST", err, syscall.ECONNRESET)
			if !errors.As(err, new(*net.OpError)) {
				t.Fatalf("ReadLazy after the peer's RST: %T is not a *net.OpError", err)
			}
		}

		c.Close()
		_, err = r.ReadLazy(bufs)
		wantIs(t, "ReadLazy after Close", err, net.ErrClosed)
		r.ReleaseBuffer()
		if n := bufs.Borrowed(); n != 0 {
			t.Fatalf("at the end, %d buffers borrowed, want 0", n)
		}
	})
}

// TestReadLazyAllocs: a read that finds input allocates nothing once the
// connection has read once (the engine's hot path).
func TestReadLazyAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("under the race detector, sync.Pool drops buffers on purpose")
	}
	client, server := tcpPair(t, "127.0.0.1")
	r := TCP(server).(LazyReader)
	bufs := NewBuffers(64)
	read := func() {
		if _, err := client.Write([]byte{'x'}); err != nil {
			t.Fatalf("Write: %v", err)
		}
		if p, err := r.ReadLazy(bufs); err != nil || len(p) != 1 {
			t.Fatalf("ReadLazy = %q, %v", p, err)
		}
	}
	read()
	if allocs := testing.AllocsPerRun(100, read); allocs != 0 {
		t.Fatalf("ReadLazy allocates %v times per read; want 0", allocs)
	}
	r.ReleaseBuffer()
}
