package sockfsm_test

// TestShutdownRacesAccept, over a real loopback socket. The failure-mode
// tests that any driver must pass (a peer's reset mid-stream, slowloris, a
// flood without reading, running out of descriptors) are in
// internal/drivertest, run by TestDrivers; this one stays here because it
// wraps the listener, which only the goroutine driver serves as given.
//
// As in the suite, no test asserts how long anything took: every client
// socket and every wait has a deadline (fmDeadline) so that a bug fails a
// test instead of hanging it. The helpers carry an fm prefix so as not to
// clash with the other test files of the package.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// fmDeadline bounds every client socket's I/O and every wait in this file.
// It is a bound against hangs, not a timing assertion.
const fmDeadline = 10 * time.Second

// ---- a server whose connections report how they ended -------------------------

// fmLogWriter passes a server's log lines to t.Log while the test runs.
type fmLogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *fmLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// fmDial connects to addr with a deadline on every operation; the
// connection is closed when the test ends.
func fmDial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, fmDeadline)
	if err != nil {
		t.Fatalf("Dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(fmDeadline)); err != nil {
		t.Fatalf("SetDeadline: %v", err)
	}
	return c.(*net.TCPConn)
}

// fmReadToEOF reads until an error; it returns what it read and the error,
// nil for a clean EOF.
func fmReadToEOF(c net.Conn) ([]byte, error) {
	b, err := io.ReadAll(c)
	return b, err
}

// ---- peer reset -------------------------------------------------------------------

// ---- slowloris --------------------------------------------------------------------

// ---- flood without reading --------------------------------------------------------

// ---- out of file descriptors ---------------------------------------------------

// ---- shutdown racing accept -------------------------------------------------------

// fmNotifyListener reports when it is closed.
type fmNotifyListener struct {
	net.Listener
	once   sync.Once
	closed chan struct{}
}

func (l *fmNotifyListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// fmOnClose is Echo with an OnClose hook.
type fmOnClose func(sockfsm.CloseInfo)

func (fmOnClose) OnData(c *sockfsm.Conn, p []byte)                  { c.Write(p) }
func (f fmOnClose) OnClose(_ *sockfsm.Conn, info sockfsm.CloseInfo) { f(info) }

// TestShutdownRacesAccept: a connection that Accept has returned but that
// Serve has not yet registered when Shutdown runs (the accepting goroutine
// was descheduled in between; here NewHandler, which runs in between, holds
// it there) is still a connection of the server: Shutdown must not return
// before it is closed. cmd/server exits when Shutdown returns, so a
// connection lost this way is closed by the process's exit, never served
// and never reported; TestSIGTERMUnderLoad in cmd/server has seen it happen
// under load (before the fix: Serve now counts an accept in flight until the
// connection is registered).
func TestShutdownRacesAccept(t *testing.T) {
	checkFDs(t)
	entered, release := make(chan struct{}), make(chan struct{})
	var (
		once     sync.Once
		isClosed atomic.Bool
	)
	closed := make(chan sockfsm.CloseInfo, 1)
	srv := &sockfsm.Server{
		Config: sockfsm.Config{Logger: slog.New(slog.NewTextHandler(&fmLogWriter{t: t}, nil))},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler {
			once.Do(func() { close(entered) })
			select {
			case <-release:
			case <-time.After(fmDeadline):
			}
			return fmOnClose(func(info sockfsm.CloseInfo) { isClosed.Store(true); closed <- info })
		},
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &fmNotifyListener{Listener: inner, closed: make(chan struct{})}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	c := fmDial(t, ln.Addr().String())
	select {
	case <-entered:
	case <-time.After(fmDeadline):
		t.Fatal("the connection was not accepted")
	}
	type result struct {
		err      error
		isClosed bool
	}
	shut := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), fmDeadline)
		defer cancel()
		err := srv.Shutdown(ctx)
		shut <- result{err, isClosed.Load()}
	}()
	select {
	case <-ln.closed:
	case <-time.After(fmDeadline):
		t.Fatal("Shutdown did not close the listener")
	}
	srv.NumConns() // takes the server's lock: Shutdown's first step is over
	close(release)

	var r result
	select {
	case r = <-shut:
	case <-time.After(2 * fmDeadline):
		t.Fatal("Shutdown did not return")
	}
	if r.err != nil || !r.isClosed {
		t.Errorf("Shutdown returned %v with the accepted connection still open (closed: %v); want nil after it is closed", r.err, r.isClosed)
	}
	// Either way, the connection is served (a graceful close) and ends.
	if b, err := fmReadToEOF(c); err != nil || len(b) != 0 {
		t.Errorf("client: read %q, %v; want EOF", b, err)
	}
	c.Close()
	select {
	case info := <-closed:
		if info.Reason != sockfsm.ReasonShutdown {
			t.Errorf("CloseInfo.Reason = %v, want %v", info.Reason, sockfsm.ReasonShutdown)
		}
	case <-time.After(fmDeadline):
		t.Fatal("the connection did not close")
	}
	select {
	case err := <-served:
		if !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	case <-time.After(fmDeadline):
		t.Fatal("Serve did not return")
	}
}
