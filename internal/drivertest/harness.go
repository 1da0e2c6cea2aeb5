package drivertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
	"github.com/sockfsm/sockfsm/internal/testutil"
)

const (
	// clientDeadline bounds every client socket's I/O and every wait. It
	// is a bound, not a timing assertion.
	clientDeadline = conntest.Deadline
	// testBound bounds a whole test, its cleanups included: past it the
	// watchdog prints every goroutine's stack and stops the process, so
	// that a driver that hangs (a Shutdown that never returns, say) fails
	// with the stacks that show where, not at go test's -timeout.
	testBound = 2 * time.Minute
)

// ---- the checks every test ends with ------------------------------------------

// check arms a test's watchdog and registers its final checks: when the
// test ends, after its other cleanups (which close its clients and shut
// its servers down), no goroutine started during the test may be left,
// and the number of open descriptors must be back to what it was, within
// testutil.FDSettle (testutil.CheckFDs). The tolerance is zero: the
// runtime's own descriptors are opened before the first baseline, and the
// few the race detector's runtime opens for a moment are waited for, not
// tolerated.
func check(t *testing.T) {
	t.Helper()
	name := t.Name()
	watchdog := time.AfterFunc(testBound, func() {
		buf := make([]byte, 8<<20)
		buf = buf[:runtime.Stack(buf, true)]
		fmt.Fprintf(os.Stderr, "drivertest: %s still running after %v; every goroutine:\n%s\n", name, testBound, buf)
		panic("drivertest: " + name + " still running after " + testBound.String())
	})
	t.Cleanup(func() { watchdog.Stop() }) // registered first, so it runs last

	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		if err := goleak.Find(ignore); err != nil {
			t.Errorf("goroutines leaked: %v", err)
		}
	})

	testutil.CheckFDs(t)
}

// ---- what the server reports ---------------------------------------------------

// edge is one transition reported by Config.OnStateChange.
type edge struct {
	From, To fsm.State
	Ev       fsm.Event
}

// recorder holds what a server's hooks report, for every connection, keyed
// by the connection's remote address (its client's local address): its
// transitions (Config.OnStateChange) and its CloseInfo (Config.OnClose),
// and how many connections were open at most at once (a connection is open
// from its first transition out of Accepted until its transition to
// Closed). changed is closed and replaced on every report.
type recorder struct {
	mu            sync.Mutex
	changed       chan struct{}
	edges         map[string][]edge
	closes        map[string]sockfsm.CloseInfo
	closeCalls    map[string]int
	open, maxOpen int
}

func newRecorder() *recorder {
	return &recorder{
		changed:    make(chan struct{}),
		edges:      map[string][]edge{},
		closes:     map[string]sockfsm.CloseInfo{},
		closeCalls: map[string]int{},
	}
}

func (r *recorder) update(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f()
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *recorder) onStateChange(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
	k := conntest.AddrKey(c.RemoteAddr)
	r.update(func() {
		r.edges[k] = append(r.edges[k], edge{from, to, ev})
		if from == fsm.Accepted {
			r.open++
			r.maxOpen = max(r.maxOpen, r.open)
		}
		if to == fsm.Closed {
			r.open--
		}
	})
}

func (r *recorder) onClose(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
	k := conntest.AddrKey(c.RemoteAddr)
	r.update(func() {
		r.closes[k] = info
		r.closeCalls[k]++
	})
}

// ---- servers ---------------------------------------------------------------------

// server is a driver's Server serving on a loopback listener, with its
// hooks recorded.
type server struct {
	Server
	addr string
	rec  *recorder
	logs *testutil.LogWriter

	served   chan struct{} // closed when Serve has returned
	serveErr error
}

// start serves newHandler's handlers with cfg on a new listener on
// 127.0.0.1:0.
func start(t *testing.T, f Factory, cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *server {
	t.Helper()
	return startOn(t, f, "127.0.0.1:0", cfg, newHandler)
}

// startOn serves newHandler's handlers with cfg on a new TCP listener on
// addr. cfg's OnStateChange, OnClose and Logger are replaced by the
// recorders'. When the test ends (after its clients have been closed) the
// server is shut down: Shutdown must return nil (a test that shut the
// server down itself checks its own result), Serve must have returned
// ErrServerClosed, NumConns must be 0, and every connection must have been
// reported closed exactly once, after a path through the table from
// Accepted to Closed.
func startOn(t *testing.T, f Factory, addr string, cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *server {
	t.Helper()
	s := &server{rec: newRecorder(), logs: testutil.NewLogWriter(t), served: make(chan struct{})}
	cfg.OnStateChange = s.rec.onStateChange
	cfg.OnClose = s.rec.onClose
	cfg.Logger = slog.New(slog.NewTextHandler(s.logs, nil))
	s.Server = f(cfg, newHandler)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("Listen(tcp, %s): %v", addr, err)
	}
	s.addr = ln.Addr().String()
	go func() {
		s.serveErr = s.Serve(ln)
		close(s.served)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		err, ok := returns(t, "Shutdown at the end of the test", func() error { return s.Shutdown(ctx) })
		if !ok {
			return
		}
		if err != nil {
			t.Errorf("Shutdown at the end of the test: %v", err)
		}
		if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if n := s.NumConns(); n != 0 {
			t.Errorf("NumConns after Shutdown = %d, want 0", n)
		}
		s.checkAllClosed(t)
	})
	return s
}

// returns calls f (a Shutdown or a Close) and waits for it to return, for
// at most twice clientDeadline: a driver whose Shutdown or Close hangs fails
// the test (the call's goroutine is left behind, and reported as leaked)
// instead of hanging it. ok is false if f did not return.
func returns(t *testing.T, what string, f func() error) (err error, ok bool) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err, true
	case <-time.After(2 * clientDeadline):
		t.Errorf("%s did not return", what)
		return nil, false
	}
}

// checkAllClosed checks, once the server is shut down, that every
// connection it started took a path through the table from Accepted to
// Closed and was reported closed exactly once.
func (s *server) checkAllClosed(t *testing.T) {
	t.Helper()
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	keys := make([]string, 0, len(s.rec.edges))
	for k := range s.rec.edges {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if n := s.rec.closeCalls[k]; n != 1 {
			t.Errorf("connection from %s: Config.OnClose called %d times, want once", k, n)
		}
		if err := pathError(s.rec.edges[k]); err != nil {
			t.Errorf("connection from %s: %v (lifecycle: %s)", k, err, describe(s.rec.edges[k]))
		} else if t.Failed() {
			t.Logf("connection from %s: %s", k, describe(s.rec.edges[k]))
		}
	}
	if s.rec.open != 0 {
		t.Errorf("%d connections never reached Closed", s.rec.open)
	}
}

// serveResult waits (bounded) for Serve to return and returns its error.
func (s *server) serveResult(t *testing.T) error {
	t.Helper()
	select {
	case <-s.served:
		return s.serveErr
	case <-time.After(clientDeadline):
		t.Fatal("Serve did not return")
		return nil
	}
}

// waitFor waits (bounded) until cond, called with the recorder locked,
// holds.
func (s *server) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(clientDeadline)
	defer timeout.Stop()
	for {
		s.rec.mu.Lock()
		ok, ch := cond(), s.rec.changed
		s.rec.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

// closed waits (bounded) for the connection from client c to close and
// returns how it ended.
func (s *server) closed(t *testing.T, c net.Conn) sockfsm.CloseInfo {
	t.Helper()
	k := conntest.Key(c)
	var info sockfsm.CloseInfo
	s.waitFor(t, "the server to close the connection from "+k, func() bool {
		var ok bool
		info, ok = s.rec.closes[k]
		return ok
	})
	return info
}

// peekClosed returns the CloseInfo of the connection from client c, if it
// has closed.
func (s *server) peekClosed(c net.Conn) (sockfsm.CloseInfo, bool) {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	info, ok := s.rec.closes[conntest.Key(c)]
	return info, ok
}

// edgesOf returns a copy of the transitions of client c's connection.
func (s *server) edgesOf(c net.Conn) []edge {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	return append([]edge(nil), s.rec.edges[conntest.Key(c)]...)
}

// state returns the state client c's connection is in (Accepted if it has
// not started).
func (s *server) state(c net.Conn) fsm.State {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	return s.stateLocked(c)
}

func (s *server) stateLocked(c net.Conn) fsm.State {
	es := s.rec.edges[conntest.Key(c)]
	if len(es) == 0 {
		return fsm.Accepted
	}
	return es[len(es)-1].To
}

// sawEventLocked reports whether client c's connection has taken an edge
// labelled ev.
func (s *server) sawEventLocked(c net.Conn, ev fsm.Event) bool {
	for _, e := range s.rec.edges[conntest.Key(c)] {
		if e.Ev == ev {
			return true
		}
	}
	return false
}

// waitEvent waits (bounded) for client c's connection to take an edge
// labelled ev.
func (s *server) waitEvent(t *testing.T, c net.Conn, ev fsm.Event) {
	t.Helper()
	s.waitFor(t, fmt.Sprintf("the connection from %s to take %s", conntest.Key(c), ev), func() bool { return s.sawEventLocked(c, ev) })
}

func (s *server) maxOpenConns() int {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	return s.rec.maxOpen
}

// ---- the lifecycle ---------------------------------------------------------------

// pathError reports why edges is not a path through the table from
// Accepted to Closed (each edge one of fsm.Transitions(), starting where
// the last one ended), or nil.
func pathError(edges []edge) error {
	legal := map[fsm.Transition]bool{}
	for _, tr := range fsm.Transitions() {
		legal[tr] = true
	}
	at := fsm.Accepted
	for i, e := range edges {
		if e.From != at {
			return fmt.Errorf("edge %d %s -%s-> %s starts in %s, but the connection was in %s", i, e.From, e.Ev, e.To, e.From, at)
		}
		if !legal[fsm.Transition{From: e.From, Event: e.Ev, To: e.To}] {
			return fmt.Errorf("edge %d %s -%s-> %s is not an edge of the table", i, e.From, e.Ev, e.To)
		}
		at = e.To
	}
	if at != fsm.Closed {
		return fmt.Errorf("the connection ended in %s, want %s", at, fsm.Closed)
	}
	return nil
}

func describe(edges []edge) string {
	var s []string
	for _, e := range edges {
		s = append(s, fmt.Sprintf("%s -%s-> %s", e.From, e.Ev, e.To))
	}
	return strings.Join(s, ", ")
}

// ---- clients -------------------------------------------------------------------------

// dial connects a client to addr with a deadline on every operation; the
// client is closed when the test ends.
func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, clientDeadline)
	if err != nil {
		t.Fatalf("Dial(tcp, %s): %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(clientDeadline)); err != nil {
		t.Fatalf("SetDeadline: %v", err)
	}
	return c.(*net.TCPConn)
}

// echo sends msg on c and reads its echo.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	conntest.MustWrite(t, c, []byte(msg))
	if got := conntest.ReadFull(t, c, len(msg)); string(got) != msg {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

// exchange runs the tutorial's client on a new connection: send msg,
// half-close, read to EOF. The echo must be msg exactly, then EOF (not a
// reset).
func exchange(t *testing.T, addr string, msg []byte) *net.TCPConn {
	t.Helper()
	c := dial(t, addr)
	conntest.MustWrite(t, c, msg)
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes: got %d bytes, not the same", len(msg), len(got))
	}
	return c
}

// isWriteReset reports whether a write's error is the peer's reset
// (ECONNRESET, or EPIPE once the reset was reported).
func isWriteReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// expectGone checks that the server has closed the connection entirely, not
// just half-closed it: reading ends (with the server's FIN or its RST), and
// if it ended with FIN, writing soon fails, because a closed socket answers
// data with RST. Call it once the server has reported the close.
func expectGone(t *testing.T, c net.Conn) {
	t.Helper()
	n, err := conntest.Drain(c, nil)
	switch {
	case conntest.IsReset(err):
		return
	case err != io.EOF:
		t.Fatalf("client read: %v after %d bytes; want io.EOF or ECONNRESET", err, n)
	}
	for range 200 { // bounded: at most about 2s
		if _, err := c.Write([]byte("?")); err != nil {
			if isWriteReset(err) {
				return
			}
			t.Fatalf("client write after the server's close: %v; want EPIPE or ECONNRESET", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("client writes still succeed: the server did not close its socket")
}

// expectRefused checks that nothing accepts on addr any more.
func expectRefused(t *testing.T, addr, after string) {
	t.Helper()
	if c, err := net.DialTimeout("tcp", addr, clientDeadline); err == nil {
		c.Close()
		t.Errorf("Dial after %s succeeded: the server still accepts", after)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("Dial after %s: %v, want ECONNREFUSED", after, err)
	}
}
