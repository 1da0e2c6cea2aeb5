package sockfsm

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/transport"
)

// waitBorrowed waits, bounded, until bufs has n buffers lent out.
func waitBorrowed(t *testing.T, what string, bufs *transport.Buffers, n int64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); bufs.Borrowed() != n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d read buffers borrowed, want %d", what, bufs.Borrowed(), n)
		}
	}
}

// skipUnlessLazyTCP skips the test where the TCP adapter is not a
// transport.LazyReader (it is on Unix systems).
func skipUnlessLazyTCP(t *testing.T) {
	if _, ok := transport.TCP(nil).(transport.LazyReader); !ok {
		t.Skip("the TCP adapter is not a LazyReader here")
	}
}

// TestIdleConnectionsHoldNoReadBuffer: over TCP, a connection waiting for
// input holds no read buffer (on Unix, where the TCP adapter is a
// transport.LazyReader), and every buffer comes back when connections
// close, whatever they read.
func TestIdleConnectionsHoldNoReadBuffer(t *testing.T) {
	skipUnlessLazyTCP(t)
	const size = 4000 // a pool of its own: other tests' connections do not count
	bufs := readBuffers(size)
	srv := newEchoServer(size)
	m := startIdleMeter(t, srv.Serve, srv.Shutdown, srv.NumConns, ErrServerClosed)

	const n = 20
	big := bytes.Repeat([]byte("0123456789"), 1000) // several buffers' worth
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range n {
		c, err := net.DialTimeout("tcp", m.addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		msg := []byte{'x'}
		if i == 0 {
			msg = big
		}
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo of %d bytes: %v (equal: %v)", len(msg), err, bytes.Equal(got, msg))
		}
	}
	m.waitConns(n)
	waitBorrowed(t, "20 idle connections", bufs, 0)

	// Half of them close gracefully, the others are reset.
	for i, c := range conns {
		if i%2 == 0 {
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c)
		} else {
			c.(*net.TCPConn).SetLinger(0)
		}
		c.Close()
	}
	conns = conns[:0]
	m.waitConns(0)
	waitBorrowed(t, "after every connection closed", bufs, 0)
}

// TestReadBufferReturned: over a transport that is not a LazyReader (a
// pipe), the connection holds one buffer from start to close, and gives it
// back.
func TestReadBufferReturned(t *testing.T) {
	const size = 4001
	bufs := readBuffers(size)
	client, server := transport.Pipe()
	var caps atomic.Int64 // capacity seen past len(p)
	h := HandlerFunc(func(c *Conn, p []byte) {
		caps.Add(int64(cap(p) - len(p)))
		c.Write(p)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan CloseInfo, 1)
	go func() {
		info, _ := ServeConn(ctx, server, h, Config{ReadBufferSize: size, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		done <- info
	}()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	if b := bufs.Borrowed(); b != 1 {
		t.Errorf("an open connection over a pipe holds %d read buffers, want 1", b)
	}
	if c := caps.Load(); c != 0 {
		t.Errorf("OnData's p had %d bytes of capacity past its length: the rest of a shared buffer shows", c)
	}
	client.CloseWrite()
	io.Copy(io.Discard, client)
	client.Close()
	if info := <-done; info.Reason != ReasonPeerClosed {
		t.Errorf("reason %v, want %v", info.Reason, ReasonPeerClosed)
	}
	if b := bufs.Borrowed(); b != 0 {
		t.Errorf("after ServeConn returned, %d read buffers borrowed, want 0", b)
	}
}

// TestBlockedWriterHoldsNoReadBuffer: a connection whose peer sends and
// never reads ends up blocked in a write, for as long as WriteTimeout;
// meanwhile it holds no read buffer (on Unix, over TCP).
func TestBlockedWriterHoldsNoReadBuffer(t *testing.T) {
	skipUnlessLazyTCP(t)
	const size = 4002
	bufs := readBuffers(size)
	srv := newEchoServer(size)
	m := startIdleMeter(t, srv.Serve, srv.Shutdown, srv.NumConns, ErrServerClosed)
	c, err := net.DialTimeout("tcp", m.addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// Send until the socket buffers on both sides are full and our write
	// blocks; the server is then blocked writing its echo.
	sent := make(chan error, 1)
	var progress atomic.Int64 // bytes sent
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			n, err := c.Write(chunk)
			progress.Add(int64(n))
			if err != nil {
				sent <- err
				return
			}
		}
	}()
	// The writer is stuck once it has made no progress for a while; then
	// the server must be blocked in its write, and hold no read buffer.
	last, stuckSince := int64(-1), time.Now()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the server's connection is blocked writing to a peer that does not read, and holds %d read buffers; want 0 (sent %d bytes)", bufs.Borrowed(), progress.Load())
		}
		if p := progress.Load(); p != last {
			last, stuckSince = p, time.Now()
			continue
		}
		if time.Since(stuckSince) > 200*time.Millisecond && last > 0 && bufs.Borrowed() == 0 {
			break
		}
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	<-sent
	m.waitConns(0)
	waitBorrowed(t, "after the connection closed", bufs, 0)
}
