package loop

// Real-socket tests of Server over loopback TCP and Unix sockets: what a
// client observes (the bytes, EOF against reset) and what the server
// reports (CloseInfo, the state changes). No test asserts how long
// anything took: the timeouts in the servers' Config are short so that
// the tests are fast, and every client socket and every wait has a bound
// (clientDeadline), so that a bug fails a test instead of hanging it.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
	"github.com/sockfsm/sockfsm/internal/testutil"
)

// clientDeadline bounds every client socket's I/O and every wait.
const clientDeadline = conntest.Deadline

// ---- what the server reports --------------------------------------------------

// recorder records each connection's transitions and CloseInfo, keyed by
// its remote address (the client's local address).
type recorder struct {
	mu     sync.Mutex
	edges  map[string][]fsm.Event
	states map[string]fsm.State
	closed map[string]sockfsm.CloseInfo
	open   int
	most   int
}

func newRecorder() *recorder {
	return &recorder{edges: map[string][]fsm.Event{}, states: map[string]fsm.State{}, closed: map[string]sockfsm.CloseInfo{}}
}

func (r *recorder) onState(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := conntest.AddrKey(c.RemoteAddr)
	r.edges[k] = append(r.edges[k], ev)
	r.states[k] = to
	if from == fsm.Accepted {
		r.open++
		r.most = max(r.most, r.open)
	}
	if to == fsm.Closed {
		r.open--
	}
}

func (r *recorder) onClose(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := conntest.AddrKey(c.RemoteAddr)
	if _, ok := r.closed[k]; ok {
		panic("OnClose called twice for " + k)
	}
	r.closed[k] = info
}

func (r *recorder) saw(k string, ev fsm.Event) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.edges[k] {
		if e == ev {
			return true
		}
	}
	return false
}

func (r *recorder) events(k string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var s []string
	for _, e := range r.edges[k] {
		s = append(s, e.String())
	}
	return strings.Join(s, " ")
}

func (r *recorder) peek(k string) (sockfsm.CloseInfo, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	info, ok := r.closed[k]
	return info, ok
}

func (r *recorder) wait(t *testing.T, k string) sockfsm.CloseInfo {
	t.Helper()
	var info sockfsm.CloseInfo
	conntest.WaitUntil(t, "the server to close the connection from "+k, func() bool {
		var ok bool
		info, ok = r.peek(k)
		return ok
	})
	return info
}

// ---- servers ------------------------------------------------------------------

type testServer struct {
	srv      *Server
	network  string
	addr     string
	rec      *recorder
	served   chan struct{}
	serveErr error
}

// testLogger logs through t while the test runs (testutil.LogWriter).
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testutil.NewLogWriter(t), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// startServer serves with cfg on a new listener on network and addr, with
// loops loops. When the test ends the server is shut down; Shutdown must
// return nil, Serve ErrServerClosed, and NumConns must be 0.
func startServer(t *testing.T, network, addr string, loops int, cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *testServer {
	t.Helper()
	ts := &testServer{network: network, rec: newRecorder(), served: make(chan struct{})}
	cfg.OnStateChange = ts.rec.onState
	cfg.OnClose = ts.rec.onClose
	cfg.Logger = testLogger(t)
	ts.srv = &Server{Config: cfg, NewHandler: newHandler, Loops: loops}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatalf("Listen(%s, %s): %v", network, addr, err)
	}
	ts.addr = ln.Addr().String()
	go func() {
		ts.serveErr = ts.srv.Serve(ln)
		close(ts.served)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		if err := ts.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown at the end of the test: %v", err)
		}
		if err := ts.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if n := ts.srv.NumConns(); n != 0 {
			t.Errorf("NumConns after Shutdown = %d, want 0", n)
		}
	})
	return ts
}

func (ts *testServer) serveResult(t *testing.T) error {
	t.Helper()
	select {
	case <-ts.served:
		return ts.serveErr
	case <-time.After(clientDeadline):
		t.Fatal("Serve did not return")
		return nil
	}
}

func (ts *testServer) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.DialTimeout(ts.network, ts.addr, clientDeadline)
	if err != nil {
		t.Fatalf("Dial(%s, %s): %v", ts.network, ts.addr, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(clientDeadline))
	return c
}

// ---- client side --------------------------------------------------------------

// ---- the tests ------------------------------------------------------------------
//
// The real-socket tests every driver passes (idle timeout, linger, write
// timeout, Shutdown, Close, MaxConns, peer reset, ...) are the shared suite,
// internal/drivertest, run on this driver by TestDrivers (drivers_test.go).
// Those here are the loop's own.

// TestTutorialFlow is the Winsock tutorial's client against the echo server
// on the loop: send "this is a test", half-close, read the 14 bytes back
// and then EOF, never a reset; the server half-closes after the peer's FIN
// and closes without lingering. Over IPv4, IPv6 and a Unix socket.
func TestTutorialFlow(t *testing.T) {
	for _, tc := range []struct{ name, network, addr string }{
		{"IPv4", "tcp", "127.0.0.1:0"},
		{"IPv6", "tcp", "[::1]:0"},
		{"Unix", "unix", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "IPv6" && !nettest.SupportsIPv6() {
				t.Skip("IPv6 is not available")
			}
			if tc.network == "unix" {
				tc.addr = filepath.Join(t.TempDir(), "s")
			}
			checkFDs(t)
			ts := startServer(t, tc.network, tc.addr, 2, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
			c := ts.dial(t)
			const msg = "this is a test"
			conntest.MustWrite(t, c, []byte(msg))
			conntest.CloseWrite(t, c)
			if got := conntest.ReadToEOF(t, c); string(got) != msg {
				t.Fatalf("client received %q, want %q", got, msg)
			}
			k := conntest.Key(c) // "@" for every unnamed Unix peer, as net has it
			info := ts.rec.wait(t, k)
			conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true,
				BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})
			t.Logf("events: %s", ts.rec.events(k))
		})
	}
}

// TestConnInfo: the handler sees the addresses net would give it.
func TestConnInfo(t *testing.T) {
	checkFDs(t)
	infos := make(chan sockfsm.ConnInfo, 2)
	for _, addr := range []string{"127.0.0.1:0", "0.0.0.0:0"} {
		ts := startServer(t, "tcp", addr, 1, sockfsm.Config{}, func(ci sockfsm.ConnInfo) sockfsm.Handler {
			infos <- ci
			return sockfsm.Echo{}
		})
		_, port, _ := net.SplitHostPort(ts.addr)
		ts.addr = net.JoinHostPort("127.0.0.1", port)
		c := ts.dial(t)
		ci := <-infos
		if ci.RemoteAddr.String() != c.LocalAddr().String() || ci.LocalAddr.String() != c.RemoteAddr().String() {
			t.Errorf("listening on %s: ConnInfo %v -> %v, want %v -> %v", addr, ci.RemoteAddr, ci.LocalAddr, c.LocalAddr(), c.RemoteAddr())
		}
		if ci.RemoteAddr.Network() != "tcp" || ci.LocalAddr.Network() != "tcp" {
			t.Errorf("ConnInfo networks %q, %q; want tcp", ci.RemoteAddr.Network(), ci.LocalAddr.Network())
		}
		c.Close()
	}
}

// TestPushFromAnotherGoroutine: a goroutine other than the loop writes to
// an idle connection and closes it: the loop's eventfd wakes it.
func TestPushFromAnotherGoroutine(t *testing.T) {
	checkFDs(t)
	conns := make(chan *sockfsm.Conn, 1)
	ts := startServer(t, "tcp", "127.0.0.1:0", 2, sockfsm.Config{}, conntest.Always(openHandler(func(c *sockfsm.Conn) { conns <- c })))
	c := ts.dial(t)
	var sc *sockfsm.Conn
	select {
	case sc = <-conns:
	case <-time.After(clientDeadline):
		t.Fatal("the server never opened the connection")
	}
	for i := range 3 {
		msg := fmt.Sprintf("push %d", i)
		if _, err := sc.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if got := conntest.ReadFull(t, c, len(msg)); string(got) != msg {
			t.Fatalf("pushed %q, client read %q", msg, got)
		}
	}
	done := make(chan struct{})
	if err := sc.Do(func(*sockfsm.Conn) { close(done) }); err != nil {
		t.Fatal(err)
	}
	<-done
	sc.Close()
	conntest.ReadToEOF(t, c)
	c.Close()
	conntest.CheckInfo(t, ts.rec.wait(t, conntest.Key(c)), conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: 0, BytesWritten: 18})
}

// openHandler echoes and calls open in OnOpen.
type openHandler func(c *sockfsm.Conn)

func (h openHandler) OnData(c *sockfsm.Conn, p []byte) { c.Write(p) }
func (h openHandler) OnOpen(c *sockfsm.Conn)           { h(c) }

// TestManyConns: 1000 connections at once across four loops, each doing
// the tutorial's exchange with bytes of its own.
func TestManyConns(t *testing.T) {
	if testing.Short() {
		t.Skip("1000 connections")
	}
	checkFDs(t)
	ts := startServer(t, "tcp", "127.0.0.1:0", 4, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	const n = 1000
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = ts.dial(t)
	}
	conntest.WaitUntil(t, "every connection to be accepted", func() bool { return ts.srv.NumConns() == n })
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	for i, c := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			msg := fmt.Appendf(nil, "connection %d says this is a test", i)
			if _, err := c.Write(msg); err != nil {
				errs <- err
				return
			}
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("connection %d: read %q, %v; want %q then EOF", i, got, err, msg)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	conntest.WaitUntil(t, "every connection to close", func() bool { return ts.srv.NumConns() == 0 })
	ts.rec.mu.Lock()
	defer ts.rec.mu.Unlock()
	if len(ts.rec.closed) != n {
		t.Errorf("%d connections reported closed, want %d", len(ts.rec.closed), n)
	}
	for k, info := range ts.rec.closed {
		if info.Reason != sockfsm.ReasonPeerClosed {
			t.Errorf("%s: %s", k, info.Reason)
		}
	}
}

// TestTLSListenerRefused: Serve refuses a TLS listener with an error
// matching ErrUnsupportedListener, and closes it.
func TestTLSListenerRefused(t *testing.T) {
	checkFDs(t)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := tls.NewListener(inner, &tls.Config{})
	srv := &Server{NewHandler: conntest.Always(sockfsm.Echo{})}
	err = srv.Serve(ln)
	if !errors.Is(err, ErrUnsupportedListener) || !strings.HasPrefix(err.Error(), "sockfsm: ") {
		t.Fatalf("Serve(tls listener) = %v, want an error matching ErrUnsupportedListener", err)
	}
	if _, err := inner.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the refused listener is still open: Accept = %v", err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
}

// TestBadConfig: Serve refuses an invalid Config, a nil NewHandler, and a
// negative Loops.
func TestBadConfig(t *testing.T) {
	for _, srv := range []*Server{
		{Config: sockfsm.Config{WriteTimeout: -1}, NewHandler: conntest.Always(sockfsm.Echo{})},
		{},
		{NewHandler: conntest.Always(sockfsm.Echo{}), Loops: -1},
	} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Serve(ln); !errors.Is(err, sockfsm.ErrInvalidConfig) && !errors.Is(err, sockfsm.ErrNoHandler) {
			t.Errorf("Serve = %v, want ErrInvalidConfig or ErrNoHandler", err)
		}
		srv.Shutdown(context.Background())
	}
}

// TestHandlerPanic: a handler's panic aborts its connection only, on the
// loop it shares with others: the loop goes on serving.
func TestHandlerPanic(t *testing.T) {
	checkFDs(t)
	ts := startServer(t, "tcp", "127.0.0.1:0", 1, sockfsm.Config{}, conntest.Always(sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
		if bytes.Contains(p, []byte("boom")) {
			panic("kaboom")
		}
		c.Write(p)
	})))
	other := ts.dial(t)
	conntest.MustWrite(t, other, []byte("before"))
	conntest.ReadFull(t, other, 6)
	c := ts.dial(t)
	conntest.MustWrite(t, c, []byte("boom"))
	info := ts.rec.wait(t, conntest.Key(c))
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerPanic, Aborted: true, Err: sockfsm.ErrHandlerPanic, BytesRead: 4, BytesWritten: 0})
	conntest.MustWrite(t, other, []byte("after"))
	if got := conntest.ReadFull(t, other, 5); string(got) != "after" {
		t.Fatalf("the other connection's echo after the panic = %q", got)
	}
	conntest.CloseWrite(t, other)
	conntest.ReadToEOF(t, other)
}

// TestMaxConnsPerIP: beyond MaxConnsPerIP open connections from one
// address a new one is closed at once (FIN) and refused through OnRefuse;
// other addresses are served, and the count drops as connections close.
func TestMaxConnsPerIP(t *testing.T) {
	checkFDs(t)
	refused := make(chan error, 4)
	cfg := sockfsm.Config{MaxConnsPerIP: 1, OnRefuse: func(_ net.Addr, reason error) { refused <- reason }}
	ts := startServer(t, "tcp", "0.0.0.0:0", 2, cfg, conntest.Always(sockfsm.Echo{}))
	_, port, _ := net.SplitHostPort(ts.addr)
	dialFrom := func(src string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: clientDeadline}
		c, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
		if err != nil {
			t.Fatalf("dial from %s: %v", src, err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(clientDeadline))
		return c
	}
	echo := func(c net.Conn) {
		t.Helper()
		conntest.MustWrite(t, c, []byte("hi"))
		if got := conntest.ReadFull(t, c, 2); string(got) != "hi" {
			t.Fatalf("echo = %q", got)
		}
	}
	c1 := dialFrom("127.0.0.1")
	echo(c1)
	c2 := dialFrom("127.0.0.1")
	if n, err := c2.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("second connection from 127.0.0.1: read %d, %v; want EOF (refused)", n, err)
	}
	select {
	case reason := <-refused:
		if !errors.Is(reason, sockfsm.ErrTooManyConnsFromIP) {
			t.Errorf("OnRefuse reason %v", reason)
		}
	case <-time.After(clientDeadline):
		t.Fatal("OnRefuse was not called")
	}
	echo(dialFrom("127.0.0.2")) // another address
	conntest.CloseWrite(t, c1)
	conntest.ReadToEOF(t, c1)
	ts.rec.wait(t, conntest.Key(c1))
	echo(dialFrom("127.0.0.1")) // its slot is free again
}

// TestMaxConnsPerIPReleasedWhenNewHandlerFails: a connection that counted
// against its address and then failed before it was registered (NewHandler
// returned nil) gives its slot back: the next connection from the same
// address is served.
func TestMaxConnsPerIPReleasedWhenNewHandlerFails(t *testing.T) {
	checkFDs(t)
	var calls atomic.Int32
	nh := func(sockfsm.ConnInfo) sockfsm.Handler {
		if calls.Add(1) == 1 {
			return nil
		}
		return sockfsm.Echo{}
	}
	ts := startServer(t, "tcp", "127.0.0.1:0", 1, sockfsm.Config{MaxConnsPerIP: 1}, nh)
	// The first connection is aborted (RST) at once: so fast, on loopback,
	// that the dial itself may report the reset.
	if c1, err := net.DialTimeout("tcp", ts.addr, clientDeadline); err == nil {
		c1.SetDeadline(time.Now().Add(clientDeadline))
		if n, err := c1.Read(make([]byte, 1)); err == nil {
			t.Fatalf("the connection whose handler failed read %d bytes; want it aborted", n)
		}
		c1.Close()
	}
	c2 := ts.dial(t)
	conntest.MustWrite(t, c2, []byte("hi"))
	if got := conntest.ReadFull(t, c2, 2); string(got) != "hi" {
		t.Fatalf("echo = %q: the address's slot was not given back", got)
	}
	conntest.CloseWrite(t, c2)
	conntest.ReadToEOF(t, c2)
	c2.Close()
}
