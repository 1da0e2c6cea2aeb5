package plain

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// clientDeadline bounds every client socket's I/O and every wait in these
// tests. It is a bound, not a timing assertion.
const clientDeadline = 10 * time.Second

func start(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Config: cfg}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		s.Shutdown(ctx)
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s, ln.Addr().String()
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, clientDeadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(clientDeadline))
	return c.(*net.TCPConn)
}

func echo(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v; want %q", buf, err, msg)
	}
}

// waitConns waits, bounded, until s has n open connections.
func waitConns(t *testing.T, s *Server, n int) {
	t.Helper()
	for deadline := time.Now().Add(clientDeadline); s.NumConns() != n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d open connections, want %d", s.NumConns(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestEchoThenPeerFIN is the tutorial's flow: echo, our FIN after the
// peer's, EOF on the client, no reset.
func TestEchoThenPeerFIN(t *testing.T) {
	s, addr := start(t, Config{})
	c := dial(t, addr)
	echo(t, c, "this is a test")
	echo(t, c, "and again")
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("after our FIN: %d bytes, %v; want EOF", n, err)
	}
	waitConns(t, s, 0)
}

// TestIdleTimeoutLingers: after the idle timeout the server sends its FIN
// and lingers; input sent meanwhile is discarded, not answered with RST.
func TestIdleTimeoutLingers(t *testing.T) {
	s, addr := start(t, Config{IdleTimeout: 20 * time.Millisecond})
	c := dial(t, addr)
	echo(t, c, "hello")
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("waiting for the server's FIN: %d bytes, %v", n, err)
	}
	if _, err := c.Write([]byte("late input, discarded")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	waitConns(t, s, 0)
}

// TestShutdown: Shutdown half-closes idle connections; they close when the
// client answers with its FIN.
func TestShutdown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	var cs []*net.TCPConn
	for range 3 {
		c := dial(t, ln.Addr().String())
		echo(t, c, "x")
		cs = append(cs, c)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	for _, c := range cs {
		if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
			t.Fatalf("waiting for the server's FIN: %d bytes, %v", n, err)
		}
		c.CloseWrite()
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if err := s.Serve(ln); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v, want ErrServerClosed", err)
	}
}

// TestShutdownDeadline: a client that never sends its FIN is reset when
// Shutdown's context ends.
func TestShutdownDeadline(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	c := dial(t, ln.Addr().String())
	echo(t, c, "x")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want the deadline", err)
	}
	<-served
	// The server's FIN, then its RST: the client sees EOF, then a reset on
	// write (or on read, depending on timing).
	io.Copy(io.Discard, c)
	var werr error
	for range 100 {
		if _, werr = c.Write([]byte("y")); werr != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(werr, syscall.ECONNRESET) && !errors.Is(werr, syscall.EPIPE) {
		t.Fatalf("write after the shutdown deadline: %v, want a reset", werr)
	}
}

// lingering returns how many goroutines are blocked reading in the function
// linger, that is, with their linger deadline armed: a moment the client
// cannot see (its FIN comes before). It reads every goroutine's stack.
func lingering() int {
	buf := make([]byte, 64<<10)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("[IO wait")) && bytes.Contains(g, []byte("/bench/plain.linger(")) {
			count++
		}
	}
	return count
}

// TestShutdownWhileLingering: Shutdown's wake-up does not cut short a
// linger already under way. The connection half-closed on its idle timeout
// and lingers for the client's FIN, which never comes: Shutdown must wait
// until its context ends and then reset it.
func TestShutdownWhileLingering(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Config: Config{IdleTimeout: 20 * time.Millisecond}}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	c := dial(t, ln.Addr().String())
	echo(t, c, "x")
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		t.Fatalf("waiting for the server's FIN: %d bytes, %v", n, err)
	}
	for deadline := time.Now().Add(clientDeadline); lingering() != 1; {
		if time.Now().After(deadline) {
			t.Fatal("the connection is not blocked lingering")
		}
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want the deadline: the linger ended without the client's FIN", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// TestServeConnOutcomes checks ServeConn's result on each path.
func TestServeConnOutcomes(t *testing.T) {
	pair := func(t *testing.T) (client, server *net.TCPConn) {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		client = dial(t, ln.Addr().String())
		sc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return client, sc.(*net.TCPConn)
	}
	t.Run("peer-closed", func(t *testing.T) {
		c, sc := pair(t)
		c.Write([]byte("hi"))
		c.CloseWrite()
		if got := ServeConn(sc, Config{}, nil); got != PeerClosed {
			t.Fatalf("outcome %d, want PeerClosed", got)
		}
	})
	t.Run("lingered", func(t *testing.T) {
		c, sc := pair(t)
		var closing atomic.Bool
		closing.Store(true)
		done := make(chan Outcome, 1)
		go func() { done <- ServeConn(sc, Config{}, &closing) }()
		io.Copy(io.Discard, c)
		c.CloseWrite()
		if got := <-done; got != Lingered {
			t.Fatalf("outcome %d, want Lingered", got)
		}
	})
	t.Run("aborted", func(t *testing.T) {
		c, sc := pair(t)
		c.SetLinger(0)
		c.Write([]byte("hi"))
		c.Close() // RST
		if got := ServeConn(sc, Config{}, nil); got != Aborted {
			t.Fatalf("outcome %d, want Aborted", got)
		}
	})
}
