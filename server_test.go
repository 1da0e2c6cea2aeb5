package sockfsm_test

// Real-socket tests of the goroutine driver's own: ServeConn and a Unix
// socket, and the helpers the package's other real-socket tests share.
// Every test talks to the engine over loopback TCP or a Unix socket, and
// checks what a client can observe (the bytes, EOF against reset) and what
// the server reports (CloseInfo, the state changes). The real-socket tests
// that every driver must pass (the tutorial's flow, the timeouts, the
// linger, Shutdown, Close, MaxConns, the failure modes) are in
// internal/drivertest, run by TestDrivers (drivers_test.go).
//
// No test asserts how long anything took. Timeouts in the servers' Config
// are short so that the tests are fast; every client socket has a deadline
// (clientDeadline) and every wait is bounded, so that a bug fails a test
// instead of hanging it.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"github.com/sockfsm/sockfsm/transport"
)

// clientDeadline bounds every client socket's I/O and every wait in these
// tests. It is a bound, not a timing assertion.
const clientDeadline = conntest.Deadline

// ---- logging ----------------------------------------------------------------

// testWriter is the io.Writer behind the servers' slog loggers: it logs
// through t and keeps a copy.
type testWriter = testutil.LogWriter

func newTestWriter(t *testing.T) *testWriter { return testutil.NewLogWriter(t) }

// ---- what the server reports ------------------------------------------------

// edge is one transition reported by Config.OnStateChange.
type edge struct {
	From, To fsm.State
	Ev       fsm.Event
}

// stateRecorder is an OnStateChange hook. It records each connection's
// transitions, keyed by the connection's remote address (the client's local
// address), and how many connections were open at most at once: a
// connection is open from its first transition out of Accepted until its
// transition to Closed.
type stateRecorder struct {
	mu            sync.Mutex
	edges         map[string][]edge
	open, maxOpen int
}

func newStateRecorder() *stateRecorder { return &stateRecorder{edges: map[string][]edge{}} }

func (r *stateRecorder) hook(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := conntest.AddrKey(c.RemoteAddr)
	r.edges[k] = append(r.edges[k], edge{from, to, ev})
	if from == fsm.Accepted {
		r.open++
		r.maxOpen = max(r.maxOpen, r.open)
	}
	if to == fsm.Closed {
		r.open--
	}
}

// closeRecorder collects the CloseInfo of every connection, keyed by its
// remote address.
type closeRecorder struct {
	mu   sync.Mutex
	list []closedConn
}

type closedConn struct {
	key  string
	conn sockfsm.ConnInfo
	info sockfsm.CloseInfo
}

func (r *closeRecorder) add(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, closedConn{conntest.AddrKey(c.RemoteAddr), c, info})
}

// peek returns the CloseInfo of the connection whose remote address is key,
// if it has closed. An empty key matches any connection.
func (r *closeRecorder) peek(key string) (sockfsm.CloseInfo, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.list {
		if key == "" || c.key == key {
			return c.info, true
		}
	}
	return sockfsm.CloseInfo{}, false
}

// wait waits (bounded) for the connection whose remote address is key to
// close and returns its CloseInfo.
func (r *closeRecorder) wait(t *testing.T, key string) sockfsm.CloseInfo {
	t.Helper()
	var info sockfsm.CloseInfo
	conntest.WaitUntil(t, "the server to close the connection from "+key, func() bool {
		var ok bool
		info, ok = r.peek(key)
		return ok
	})
	return info
}

// capture wraps a connection's handler to record its CloseInfo. It passes
// OnClose on if the wrapped handler has one.
type capture struct {
	sockfsm.Handler
	rec *closeRecorder
}

func (h capture) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	if ch, ok := h.Handler.(sockfsm.CloseHandler); ok {
		ch.OnClose(c, info)
	}
	h.rec.add(c.Info(), info)
}

// ---- servers ------------------------------------------------------------------

// testServer is a Server running on a loopback listener, with recorders.
type testServer struct {
	srv     *sockfsm.Server
	network string
	addr    string
	states  *stateRecorder
	closes  *closeRecorder
	logs    *testWriter

	served   chan struct{} // closed when Serve has returned
	serveErr error
}

// startServer serves newHandler's handlers with cfg on a new listener on
// network and addr (port 0 for TCP). cfg's OnStateChange and Logger are
// replaced by the recorders'. When the test ends (after its clients have
// been closed) the server is shut down and Serve must have returned
// ErrServerClosed.
func startServer(t *testing.T, network, addr string, cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *testServer {
	t.Helper()
	ts := &testServer{
		network: network,
		states:  newStateRecorder(),
		closes:  &closeRecorder{},
		logs:    newTestWriter(t),
		served:  make(chan struct{}),
	}
	cfg.OnStateChange = ts.states.hook
	cfg.Logger = slog.New(slog.NewTextHandler(ts.logs, nil))
	ts.srv = &sockfsm.Server{
		Config: cfg,
		NewHandler: func(c sockfsm.ConnInfo) sockfsm.Handler {
			return capture{newHandler(c), ts.closes}
		},
	}
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
		defer func() {
			if t.Failed() {
				ts.states.mu.Lock()
				defer ts.states.mu.Unlock()
				for k, es := range ts.states.edges {
					t.Logf("connection from %s: %s", k, describe(es))
				}
			}
		}()
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

// serveResult waits (bounded) for Serve to return and returns its error.
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

// dial connects a client to the server. The client has a deadline and is
// closed when the test ends.
func (ts *testServer) dial(t *testing.T) net.Conn {
	t.Helper()
	return dial(t, ts.network, ts.addr)
}

func dial(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout(network, addr, clientDeadline)
	if err != nil {
		t.Fatalf("Dial(%s, %s): %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(clientDeadline)); err != nil {
		t.Fatalf("SetDeadline: %v", err)
	}
	return c
}

// tcpPair returns a client connection and the server's end of it, accepted
// on a listener of its own on 127.0.0.1 (closed at once).
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client = dial(t, "tcp", ln.Addr().String())
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// ---- client side --------------------------------------------------------------

func describe(edges []edge) string {
	var s []string
	for _, e := range edges {
		s = append(s, fmt.Sprintf("%s -%s-> %s", e.From, e.Ev, e.To))
	}
	return strings.Join(s, ", ")
}

// ---- the tests ------------------------------------------------------------------

// TestServeConnContextCancel: ServeConn over a real TCP connection aborts
// it when its context is canceled.
func TestServeConnContextCancel(t *testing.T) {
	checkFDs(t)
	c, sc := tcpPair(t)

	type result struct {
		info sockfsm.CloseInfo
		err  error
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan result, 1)
	logs := newTestWriter(t)
	cfg := sockfsm.Config{IdleTimeout: time.Minute, Logger: slog.New(slog.NewTextHandler(logs, nil))}
	go func() {
		info, err := sockfsm.ServeConn(ctx, transport.TCP(sc.(*net.TCPConn)), sockfsm.Echo{}, cfg)
		done <- result{info, err}
	}()
	t.Cleanup(func() { // if the test fails before ServeConn returns
		cancel()
		<-done
	})

	conntest.MustWrite(t, c, []byte("ping"))
	if got := conntest.ReadFull(t, c, 4); string(got) != "ping" {
		t.Fatalf("echo = %q, want %q", got, "ping")
	}
	cancel()
	var r result
	select {
	case r = <-done:
		done <- r // for the cleanup
	case <-time.After(clientDeadline):
		t.Fatal("ServeConn did not return after its context was canceled")
	}
	if r.err != nil {
		t.Fatalf("ServeConn error: %v", r.err)
	}
	conntest.CheckInfo(t, r.info, conntest.WantInfo{Reason: sockfsm.ReasonShutdownDeadline, Aborted: true, Err: sockfsm.ErrShutdownDeadline,
		BytesRead: 4, BytesWritten: 4})
	conntest.WantReset(t, c, []byte{})
}

// TestUnixSocket: the tutorial flow over a Unix stream socket.
func TestUnixSocket(t *testing.T) {
	if !nettest.TestableNetwork("unix") {
		t.Skip("Unix sockets are not available")
	}
	checkFDs(t)
	ts := startServer(t, "unix", filepath.Join(t.TempDir(), "echo.sock"), sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	c := ts.dial(t)
	const msg = "this is a test"
	conntest.MustWrite(t, c, []byte(msg))
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); string(got) != msg {
		t.Fatalf("client received %q, want %q", got, msg)
	}
	info := ts.closes.wait(t, "")
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, Linger: sockfsm.LingerEndNone, PeerFIN: true,
		BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})
}

// ---- regressions ------------------------------------------------------------------
//
// Each test below showed a bug, since fixed, found while writing these tests.

// countingTransport counts the bytes its Writes accepted.
type countingTransport struct {
	transport.Stream
	mu      sync.Mutex
	written int64
}

func (c *countingTransport) Write(p []byte) (int, error) {
	n, err := c.Stream.Write(p)
	c.mu.Lock()
	c.written += int64(n)
	c.mu.Unlock()
	return n, err
}

// TestAbortCountsBytesWritten: CloseInfo.BytesWritten counts output that
// reached the transport, including the bytes of a Write that an abort
// (context canceled, Shutdown's deadline, Close) interrupted. (They once
// were lost: the driver applies the abort before reporting the Write, and
// WriteDone ignored bytes once the engine was Closed.)
func TestAbortCountsBytesWritten(t *testing.T) {
	checkFDs(t)
	c, sc := tcpPair(t)
	ct := &countingTransport{Stream: transport.TCP(sc.(*net.TCPConn))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		info sockfsm.CloseInfo
		err  error
	}
	done := make(chan result, 1)
	resp := conntest.Pattern(0, 16<<20)
	cfg := sockfsm.Config{WriteTimeout: time.Minute, MaxPendingOutput: len(resp),
		Logger: slog.New(slog.NewTextHandler(newTestWriter(t), nil))}
	go func() {
		info, err := sockfsm.ServeConn(ctx, ct, conntest.BigHandler(resp), cfg)
		done <- result{info, err}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	conntest.MustWrite(t, c, []byte("big"))
	// Once the client has a byte, the server's Write is under way; it then
	// blocks, since the client reads no more and the response is larger
	// than the socket buffers, until the cancel interrupts it.
	if got := conntest.ReadFull(t, c, 1); got[0] != resp[0] {
		t.Fatalf("client received %d, want %d", got[0], resp[0])
	}
	cancel()
	var r result
	select {
	case r = <-done:
		done <- r
	case <-time.After(clientDeadline):
		t.Fatal("ServeConn did not return")
	}
	conntest.WantReset(t, c, resp[1:])
	ct.mu.Lock()
	written := ct.written
	ct.mu.Unlock()
	if r.info.BytesWritten != written {
		t.Errorf("CloseInfo.BytesWritten = %d, but the transport accepted %d bytes", r.info.BytesWritten, written)
	}
}
