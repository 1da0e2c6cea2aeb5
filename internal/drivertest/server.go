package drivertest

// The server's own promises: Shutdown, Close, Serve after either, MaxConns.

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// testShutdownIdle: Shutdown half-closes every idle connection at once,
// whatever its IdleTimeout (a minute here, so that only Shutdown can close
// them within the test's bounds), whether it never sent anything or went
// quiet after an exchange: every client gets the server's FIN, EOF and
// not a reset. Once the clients close, Shutdown returns nil, Serve returns
// ErrServerClosed and the listener is closed.
func testShutdownIdle(t *testing.T, f Factory) {
	s := start(t, f, sockfsm.Config{IdleTimeout: time.Minute}, conntest.Always(sockfsm.Echo{}))
	silent := dial(t, s.addr)
	var talked []*net.TCPConn
	for range 3 {
		c := dial(t, s.addr)
		echo(t, c, "hello")
		talked = append(talked, c)
	}
	s.waitFor(t, "the server to start the silent connection", func() bool { return s.stateLocked(silent) == fsm.Receiving })

	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(ctx) }()

	for i, c := range append([]*net.TCPConn{silent}, talked...) {
		if b := conntest.ReadToEOF(t, c); len(b) != 0 {
			t.Fatalf("idle client %d received %q at shutdown", i, b)
		}
		c.Close()
	}
	if err := conntest.Recv(t, "Shutdown to return", shut); err != nil {
		t.Fatalf("Shutdown = %v, want nil", err)
	}
	if n := s.NumConns(); n != 0 {
		t.Errorf("NumConns right after Shutdown = %d, want 0", n)
	}
	if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	expectRefused(t, s.addr, "Shutdown")

	conntest.CheckInfo(t, s.closed(t, silent), conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true})
	for _, c := range talked {
		conntest.CheckInfo(t, s.closed(t, c), conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
			BytesRead: 5, BytesWritten: 5})
	}
}

// testShutdownBusy: Shutdown half-closes idle connections at once and lets
// a busy one finish its response first; every client gets all its bytes
// and then EOF, never a reset; Shutdown returns nil, Serve returns
// ErrServerClosed, and the listener is closed.
func testShutdownBusy(t *testing.T, f Factory) {
	const size = 8 << 20 // more than the loopback socket buffers hold: the server stays busy until the client reads
	resp := conntest.Pattern(0, size)
	s := start(t, f, sockfsm.Config{WriteTimeout: clientDeadline, MaxPendingOutput: size}, conntest.Always(conntest.BigHandler(resp)))

	var idle []*net.TCPConn
	for range 3 {
		c := dial(t, s.addr)
		echo(t, c, "hello")
		idle = append(idle, c)
	}
	busy := dial(t, s.addr)
	conntest.MustWrite(t, busy, []byte("big"))
	const piece = 64 << 10
	got := conntest.ReadFull(t, busy, piece)
	t.Logf("busy connection at Shutdown: %s", s.state(busy))

	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(ctx) }()

	// The idle clients get the server's FIN while the busy one has read
	// only a fraction of its response (so the server cannot have finished
	// sending it).
	for i, c := range idle {
		if b := conntest.ReadToEOF(t, c); len(b) != 0 {
			t.Fatalf("idle client %d received %q at shutdown", i, b)
		}
		c.Close()
	}
	// The busy client, reading slowly, gets all of it, then EOF.
	for len(got) < size {
		got = append(got, conntest.ReadFull(t, busy, min(piece, size-len(got)))...)
		time.Sleep(time.Millisecond)
	}
	if !bytes.Equal(got, resp) {
		t.Fatal("the busy client's response is corrupt")
	}
	if b := conntest.ReadToEOF(t, busy); len(b) != 0 {
		t.Fatalf("busy client received %d bytes more than the response", len(b))
	}
	busy.Close()

	if err := conntest.Recv(t, "Shutdown to return", shut); err != nil {
		t.Fatalf("Shutdown = %v, want nil", err)
	}
	if n := s.NumConns(); n != 0 {
		t.Errorf("NumConns after Shutdown = %d, want 0", n)
	}
	if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	expectRefused(t, s.addr, "Shutdown")

	for i, c := range idle {
		conntest.CheckInfo(t, s.closed(t, c), conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
			BytesRead: 5, BytesWritten: 5})
		if t.Failed() {
			t.Fatalf("idle client %d", i)
		}
	}
	conntest.CheckInfo(t, s.closed(t, busy), conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: 3, BytesWritten: size})
}

// testShutdownDeadline: when Shutdown's context ends before a connection
// could close gracefully (its client never reads), the connection is
// aborted, and Shutdown returns the context's error only once every
// connection is closed: the client gets what was sent, then the RST.
func testShutdownDeadline(t *testing.T, f Factory) {
	resp := conntest.Pattern(0, 16<<20)
	s := start(t, f, sockfsm.Config{WriteTimeout: time.Minute, MaxPendingOutput: len(resp)}, conntest.Always(conntest.BigHandler(resp)))
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("big"))
	s.waitEvent(t, c, fsm.Output)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err, ok := returns(t, "Shutdown", func() error { return s.Shutdown(ctx) })
	if !ok {
		t.FailNow()
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want context.DeadlineExceeded", err)
	}
	if n := s.NumConns(); n != 0 {
		t.Errorf("NumConns right after Shutdown = %d, want 0", n)
	}
	info, ok := s.peekClosed(c)
	if !ok {
		t.Fatal("Shutdown returned before the connection was closed")
	}
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonShutdownDeadline, Aborted: true, Err: sockfsm.ErrShutdownDeadline,
		BytesRead: 3, BytesWritten: -1})
	conntest.WantReset(t, c, resp)
	if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
}

// testShutdownWaitsForAccept: a connection that Serve has accepted but not
// yet registered (NewHandler is held here to widen the window; without that
// it is a few microseconds wide, but real) must still hold Shutdown back,
// and is then closed gracefully. The goroutine driver's Shutdown once
// returned nil while such a connection was about to be served.
func testShutdownWaitsForAccept(t *testing.T, f Factory) {
	entered, release := make(chan struct{}), make(chan struct{})
	var first, freed sync.Once
	s := start(t, f, sockfsm.Config{}, func(sockfsm.ConnInfo) sockfsm.Handler {
		first.Do(func() {
			close(entered)
			select {
			case <-release:
			case <-time.After(clientDeadline):
			}
		})
		return sockfsm.Echo{}
	})
	free := func() { freed.Do(func() { close(release) }) }
	t.Cleanup(free) // before the server's shutdown
	c := dial(t, s.addr)
	conntest.Recv(t, "NewHandler to be called", entered)

	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(ctx) }()
	select {
	case err := <-shut:
		// A bound on a check that nothing happens, not a timing assertion.
		t.Errorf("Shutdown returned %v while a connection it had accepted was still to be served", err)
		shut <- err
	case <-time.After(300 * time.Millisecond):
	}
	free()
	// The connection, accepted before Shutdown, is closed gracefully.
	if got := conntest.ReadToEOF(t, c); len(got) != 0 {
		t.Fatalf("client received %q", got)
	}
	c.Close()
	if err := conntest.Recv(t, "Shutdown to return", shut); err != nil {
		t.Errorf("Shutdown = %v, want nil", err)
	}
	info, ok := s.peekClosed(c)
	if !ok {
		t.Fatal("Shutdown returned before the connection it had accepted was closed")
	}
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true})
}

// testClose: Close stops accepting and aborts every connection at once, an
// idle one and one blocked writing to a client that does not read,
// whatever their timeouts (a minute here): each is reported as
// ReasonShutdownDeadline, aborted, and its client gets a reset. Close
// returns nil only when both are closed (their CloseInfo is in, NumConns
// is 0), Serve returns ErrServerClosed, and a new client is refused.
func testClose(t *testing.T, f Factory) {
	resp := conntest.Pattern(0, 16<<20) // far more than the loopback socket buffers hold
	s := start(t, f, sockfsm.Config{
		IdleTimeout: time.Minute, WriteTimeout: time.Minute, LingerTimeout: time.Minute, MaxPendingOutput: len(resp),
	}, conntest.Always(conntest.BigHandler(resp)))

	idle := dial(t, s.addr)
	echo(t, idle, "ping")

	blocked := dial(t, s.addr)
	conntest.MustWrite(t, blocked, []byte("big"))
	// The server is writing the response (the client has its first byte)
	// and cannot finish: the client reads no more.
	conntest.ReadFull(t, blocked, 1)
	s.waitFor(t, "the two connections to be Receiving and Sending", func() bool {
		return s.stateLocked(idle) == fsm.Receiving && s.stateLocked(blocked) == fsm.Sending
	})
	if n := s.NumConns(); n != 2 {
		t.Fatalf("NumConns before Close = %d, want 2", n)
	}

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	if err := conntest.Recv(t, "Close to return", closed); err != nil {
		t.Errorf("Close = %v, want nil", err)
	}
	// Checked as soon as Close has returned: nothing is left open.
	if n := s.NumConns(); n != 0 {
		t.Errorf("NumConns right after Close = %d, want 0", n)
	}
	for _, c := range []struct {
		name    string
		conn    net.Conn
		read    int64
		written int64 // -1: less than the whole response
	}{{"idle", idle, 4, 4}, {"blocked", blocked, 3, -1}} {
		info, ok := s.peekClosed(c.conn)
		if !ok {
			t.Errorf("%s connection: Close returned before it was closed", c.name)
			continue
		}
		conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonShutdownDeadline, Aborted: true, Err: sockfsm.ErrShutdownDeadline,
			BytesRead: c.read, BytesWritten: c.written})
		if c.written < 0 && info.BytesWritten >= int64(len(resp)) {
			t.Errorf("%s connection: BytesWritten = %d: the write was not interrupted", c.name, info.BytesWritten)
		}
	}
	if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	expectRefused(t, s.addr, "Close")

	// Both clients get the server's RST: the idle one at once, the
	// blocked one after what was already in its socket buffer.
	if n, err := idle.Read(make([]byte, 1)); !conntest.IsReset(err) {
		t.Errorf("idle client read: %d, %v; want ECONNRESET", n, err)
	}
	if n, err := conntest.Drain(blocked, resp[1:]); !conntest.IsReset(err) {
		t.Errorf("blocked client read: %v after %d bytes; want ECONNRESET", err, n)
	}
}

// testServeAfterShutdown: once Shutdown or Close was called, Serve returns
// sockfsm.ErrServerClosed at once and closes the listener it was given:
// on a server that was serving, and on one that never served.
func testServeAfterShutdown(t *testing.T, f Factory) {
	listen := func(t *testing.T) net.Listener {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("Listen: %v", err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln
	}
	// serveAgain calls Serve on a new listener: it must return
	// ErrServerClosed, and the listener must be closed.
	serveAgain := func(t *testing.T, srv Server) {
		t.Helper()
		ln := listen(t)
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()
		if err := conntest.Recv(t, "Serve to return", served); !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve after the server was stopped = %v, want ErrServerClosed", err)
		}
		expectRefused(t, ln.Addr().String(), "Serve returned")
	}
	stops := []struct {
		name string
		stop func(Server) error
	}{
		{"Shutdown", func(srv Server) error {
			ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
			defer cancel()
			return srv.Shutdown(ctx)
		}},
		{"Close", func(srv Server) error { return srv.Close() }},
	}
	for _, st := range stops {
		t.Run(st.name+"WhileServing", func(t *testing.T) {
			check(t)
			s := start(t, f, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
			exchange(t, s.addr, []byte("this is a test"))
			err, ok := returns(t, st.name, func() error { return st.stop(s.Server) })
			if !ok {
				t.FailNow()
			}
			if err != nil {
				t.Fatalf("%s = %v, want nil", st.name, err)
			}
			if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
				t.Errorf("Serve = %v, want ErrServerClosed", err)
			}
			serveAgain(t, s.Server)
			if n := s.NumConns(); n != 0 {
				t.Errorf("NumConns = %d, want 0", n)
			}
		})
		t.Run(st.name+"BeforeServe", func(t *testing.T) {
			check(t)
			srv := f(sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
			err, ok := returns(t, st.name, func() error { return st.stop(srv) })
			if !ok {
				t.FailNow()
			}
			if err != nil {
				t.Fatalf("%s of a server that never served = %v, want nil", st.name, err)
			}
			serveAgain(t, srv)
			if n := srv.NumConns(); n != 0 {
				t.Errorf("NumConns = %d, want 0", n)
			}
		})
	}
}

// testMaxConns: at MaxConns open connections the server stops accepting; a
// further client's connection waits in the kernel's backlog, unserved,
// until one of the open ones closes.
func testMaxConns(t *testing.T, f Factory) {
	s := start(t, f, sockfsm.Config{MaxConns: 2}, conntest.Always(sockfsm.Echo{}))
	c1, c2 := dial(t, s.addr), dial(t, s.addr)
	echo(t, c1, "one")
	echo(t, c2, "two")

	c3 := dial(t, s.addr) // accepted by the kernel, not by the server
	conntest.MustWrite(t, c3, []byte("three"))
	// A bound on a check that nothing happens, not a timing assertion.
	c3.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c3.Read(make([]byte, 8)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("third client's read = %d, %v while two connections are open; want no echo (a timeout)", n, err)
	}
	c3.SetReadDeadline(time.Now().Add(clientDeadline))
	if n := s.NumConns(); n != 2 {
		t.Errorf("NumConns = %d, want 2", n)
	}

	conntest.CloseWrite(t, c1)
	if got := conntest.ReadToEOF(t, c1); len(got) != 0 {
		t.Fatalf("first client received %q after its echo", got)
	}
	if got := conntest.ReadFull(t, c3, 5); string(got) != "three" {
		t.Fatalf("third client's echo = %q, want %q", got, "three")
	}
	for _, c := range []*net.TCPConn{c2, c3} {
		conntest.CloseWrite(t, c)
		conntest.ReadToEOF(t, c)
		s.closed(t, c)
	}
	if n := s.maxOpenConns(); n > 2 {
		t.Errorf("%d connections were open at once, want at most MaxConns = 2", n)
	}
}

// testMaxConnsSlotReleased: with MaxConns = 1, a connection that ends
// before it is served, because NewHandler panics or returns nil, is
// aborted and gives its slot back: the next connection is served. Were the
// slot kept, the next client would wait in the listen queue forever; its
// echo is bounded and fails the test instead.
func testMaxConnsSlotReleased(t *testing.T, f Factory) {
	// firstHandler returns a NewHandler that calls first for the first
	// connection and serves Echo to the others.
	firstHandler := func(first func() sockfsm.Handler) func(sockfsm.ConnInfo) sockfsm.Handler {
		var once sync.Once
		return func(sockfsm.ConnInfo) sockfsm.Handler {
			var h sockfsm.Handler = sockfsm.Echo{}
			once.Do(func() { h = first() })
			return h
		}
	}
	for _, tc := range []struct {
		name  string
		first func() sockfsm.Handler
	}{
		{"NewHandlerPanics", func() sockfsm.Handler { panic("NewHandler panics") }},
		{"NewHandlerNil", func() sockfsm.Handler { return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check(t)
			s := start(t, f, sockfsm.Config{MaxConns: 1}, firstHandler(tc.first))
			// The first client is dropped before it is served. Nothing is
			// written: a write that met the server's RST would take the
			// error, and the read would then see EOF.
			c, err := net.DialTimeout("tcp", s.addr, clientDeadline)
			switch {
			case conntest.IsReset(err):
				// The server dropped it before the dialer saw it established.
			case err != nil:
				t.Fatalf("Dial: %v", err)
			default:
				c.SetDeadline(time.Now().Add(clientDeadline))
				_, err = conntest.Drain(c, []byte{})
				c.Close()
				if !conntest.IsReset(err) {
					t.Fatalf("client of the failed NewHandler: read error %v, want ECONNRESET (aborted)", err)
				}
			}
			next := exchange(t, s.addr, []byte("the next connection is served"))
			s.closed(t, next)
		})
	}
}
