package sockfsm_test

// Tests for the places an audit found the suite blind: Server.Close, the
// accept back-off's reset after a successful accept, the MaxConns slot on
// every early exit of a connection, the TLS half-close when close_notify
// cannot be sent, MaxPendingOutput at its exact boundary, and the idle timer
// after input the handler ignores.
//
// They use the package's exported API only, over loopback (127.0.0.1). As in
// the other real-socket tests, no test asserts how long anything took: every
// client socket and every wait has a bound (auditDeadline) so that a bug
// fails a test instead of hanging it. The helpers carry an audit prefix so as
// not to clash with the other test files of the package; checkFDs
// (main_test.go) and selfSigned (tls_test.go) are reused.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/transport"
)

// auditDeadline bounds every client socket's I/O and every wait in this
// file. It is a bound against hangs, not a timing assertion.
const auditDeadline = 10 * time.Second

// ---- logs ---------------------------------------------------------------------

// auditEvent is a log record (or a marker a test adds), with its attributes.
type auditEvent struct {
	msg   string
	attrs map[string]slog.Value
}

// auditLog is a slog.Handler that keeps every record at Info and above, in
// order, and passes it to t.Log while the test runs. Attributes added with
// WithAttrs (the connection's id and address) are dropped.
type auditLog struct {
	mu      sync.Mutex
	t       *testing.T
	done    bool
	events  []auditEvent
	changed chan struct{} // closed and replaced on every event
}

func newAuditLog(t *testing.T) *auditLog {
	l := &auditLog{t: t, changed: make(chan struct{})}
	t.Cleanup(func() {
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
	})
	return l
}

func (l *auditLog) Enabled(_ context.Context, level slog.Level) bool { return level >= slog.LevelInfo }
func (l *auditLog) WithAttrs([]slog.Attr) slog.Handler               { return l }
func (l *auditLog) WithGroup(string) slog.Handler                    { return l }

func (l *auditLog) Handle(_ context.Context, r slog.Record) error {
	ev := auditEvent{msg: r.Message, attrs: map[string]slog.Value{}}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %q", r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		ev.attrs[a.Key] = a.Value
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	l.add(ev, b.String())
	return nil
}

func (l *auditLog) add(ev auditEvent, line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, ev)
	close(l.changed)
	l.changed = make(chan struct{})
	if !l.done {
		l.t.Log(line)
	}
}

// waitFor waits (bounded) until cond holds for the events so far, and
// returns them.
func (l *auditLog) waitFor(t *testing.T, what string, cond func([]auditEvent) bool) []auditEvent {
	t.Helper()
	timeout := time.NewTimer(auditDeadline)
	defer timeout.Stop()
	for {
		l.mu.Lock()
		evs, ch := append([]auditEvent(nil), l.events...), l.changed
		l.mu.Unlock()
		if cond(evs) {
			return evs
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

// ---- a server that reports how its connections end -------------------------------

// auditServer is a Server serving one listener. It records every
// connection's CloseInfo, last state and events, keyed by the connection's
// remote address (the client's local address).
type auditServer struct {
	srv    *sockfsm.Server
	addr   string
	log    *auditLog
	served chan error // Serve's result, once

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every update
	closes  map[string]sockfsm.CloseInfo
	states  map[string]fsm.State
	events  map[string][]fsm.Event

	serveOnce sync.Once
	serveErr  error
}

// auditStart serves newHandler's handlers with cfg on ln. cfg's OnClose,
// OnStateChange and Logger are the recorders'. When the test ends the server
// is shut down (after Close, if the test closed it) and Serve must have
// returned ErrServerClosed with no connection left.
func auditStart(t *testing.T, ln net.Listener, cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *auditServer {
	t.Helper()
	return auditStartLog(t, ln, cfg, newAuditLog(t), newHandler)
}

// auditStartLog is auditStart with the server logging to log.
func auditStartLog(t *testing.T, ln net.Listener, cfg sockfsm.Config, log *auditLog, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *auditServer {
	t.Helper()
	s := &auditServer{
		addr:    ln.Addr().String(),
		log:     log,
		served:  make(chan error, 1),
		changed: make(chan struct{}),
		closes:  map[string]sockfsm.CloseInfo{},
		states:  map[string]fsm.State{},
		events:  map[string][]fsm.Event{},
	}
	cfg.Logger = slog.New(s.log)
	cfg.OnClose = func(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
		s.update(func() { s.closes[c.RemoteAddr.String()] = info })
	}
	cfg.OnStateChange = func(c sockfsm.ConnInfo, _, to fsm.State, ev fsm.Event) {
		k := c.RemoteAddr.String()
		s.update(func() {
			s.states[k] = to
			s.events[k] = append(s.events[k], ev)
		})
	}
	s.srv = &sockfsm.Server{Config: cfg, NewHandler: newHandler}
	go func() { s.served <- s.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), auditDeadline)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown at the end of the test: %v", err)
		}
		if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if n := s.srv.NumConns(); n != 0 {
			t.Errorf("NumConns at the end of the test = %d, want 0", n)
		}
	})
	return s
}

func (s *auditServer) update(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f()
	close(s.changed)
	s.changed = make(chan struct{})
}

// waitFor waits (bounded) until cond, called with the recorders locked,
// holds.
func (s *auditServer) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(auditDeadline)
	defer timeout.Stop()
	for {
		s.mu.Lock()
		ok, ch := cond(), s.changed
		s.mu.Unlock()
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
func (s *auditServer) closed(t *testing.T, c net.Conn) sockfsm.CloseInfo {
	t.Helper()
	k := c.LocalAddr().String()
	var info sockfsm.CloseInfo
	s.waitFor(t, "the server to close the connection from "+k, func() bool {
		var ok bool
		info, ok = s.closes[k]
		return ok
	})
	return info
}

// peekClosed returns the CloseInfo of the connection from client c, if it
// has closed.
func (s *auditServer) peekClosed(c net.Conn) (sockfsm.CloseInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	info, ok := s.closes[c.LocalAddr().String()]
	return info, ok
}

// sawEventLocked reports, with the recorders locked, whether the
// connection from client c has taken an edge labelled ev.
func (s *auditServer) sawEventLocked(c net.Conn, ev fsm.Event) bool {
	for _, e := range s.events[c.LocalAddr().String()] {
		if e == ev {
			return true
		}
	}
	return false
}

// serveResult waits (bounded) for Serve to return and returns its error.
func (s *auditServer) serveResult(t *testing.T) error {
	t.Helper()
	s.serveOnce.Do(func() {
		select {
		case s.serveErr = <-s.served:
		case <-time.After(auditDeadline):
			s.serveErr = errors.New("no result from Serve within auditDeadline")
		}
	})
	return s.serveErr
}

// ---- clients ----------------------------------------------------------------------

func auditListen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	return ln
}

// auditDial connects to addr with a deadline on every operation; the
// connection is closed when the test ends.
func auditDial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, auditDeadline)
	if err != nil {
		t.Fatalf("Dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(auditDeadline)); err != nil {
		t.Fatalf("SetDeadline: %v", err)
	}
	return c.(*net.TCPConn)
}

// auditPattern returns n bytes that are not periodic in any power of two.
func auditPattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

func auditIsReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// auditDrain reads until an error and returns it with the count of bytes
// read; the bytes must be a prefix of want.
func auditDrain(c net.Conn, want []byte) (int, error) {
	buf := make([]byte, 64<<10)
	n := 0
	for {
		m, err := c.Read(buf)
		if n+m > len(want) || !bytes.Equal(buf[:m], want[n:n+m]) {
			return n, fmt.Errorf("bytes %d..%d are not the server's output", n, n+m)
		}
		n += m
		if err != nil {
			return n, err
		}
	}
}

// auditEcho sends msg on c and reads its echo.
func auditEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("client write: %v", err)
	}
	b := make([]byte, len(msg))
	if n, err := io.ReadFull(c, b); err != nil || string(b) != msg {
		t.Fatalf("echo: read %q, %v; want %q", b[:n], err, msg)
	}
}

// auditBig answers input that starts with "big" with resp, all queued at
// once (MaxPendingOutput must hold it), and echoes any other input.
func auditBig(resp []byte) sockfsm.Handler {
	return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
		if bytes.HasPrefix(p, []byte("big")) {
			c.Write(resp)
			return
		}
		c.Write(p)
	})
}

// ---- 1. Server.Close ----------------------------------------------------------------

// TestAuditServerClose: Close stops accepting and aborts every connection at
// once, an idle one and one blocked writing to a client that does not read,
// whatever their timeouts (a minute here): each is reported as
// ReasonShutdownDeadline, aborted, and its client gets a reset. Close returns
// nil only when both are closed (their CloseInfo is in, NumConns is 0), Serve
// returns ErrServerClosed, and a new client is refused.
func TestAuditServerClose(t *testing.T) {
	checkFDs(t)
	resp := auditPattern(16 << 20) // far more than the loopback socket buffers hold
	s := auditStart(t, auditListen(t), sockfsm.Config{
		IdleTimeout: time.Minute, WriteTimeout: time.Minute, LingerTimeout: time.Minute, MaxPendingOutput: len(resp),
	}, func(sockfsm.ConnInfo) sockfsm.Handler { return auditBig(resp) })

	idle := auditDial(t, s.addr)
	auditEcho(t, idle, "ping")

	blocked := auditDial(t, s.addr)
	if _, err := blocked.Write([]byte("big")); err != nil {
		t.Fatal(err)
	}
	// The server is writing the response (the client has its first byte)
	// and cannot finish: the client reads no more.
	if _, err := io.ReadFull(blocked, make([]byte, 1)); err != nil {
		t.Fatalf("blocked client: %v", err)
	}
	s.waitFor(t, "the two connections to be Receiving and Sending", func() bool {
		return s.states[idle.LocalAddr().String()] == fsm.Receiving && s.states[blocked.LocalAddr().String()] == fsm.Sending
	})
	if n := s.srv.NumConns(); n != 2 {
		t.Fatalf("NumConns before Close = %d, want 2", n)
	}

	closed := make(chan error, 1)
	go func() { closed <- s.srv.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close = %v, want nil", err)
		}
	case <-time.After(auditDeadline):
		t.Fatal("Close did not return")
	}
	// Checked as soon as Close has returned: nothing is left open.
	if n := s.srv.NumConns(); n != 0 {
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
		if info.Reason != sockfsm.ReasonShutdownDeadline || !info.Aborted() || !errors.Is(info.Err, sockfsm.ErrShutdownDeadline) {
			t.Errorf("%s connection: CloseInfo %+v; want ReasonShutdownDeadline, aborted, Err matching ErrShutdownDeadline", c.name, info)
		}
		if info.BytesRead != c.read {
			t.Errorf("%s connection: BytesRead = %d, want %d", c.name, info.BytesRead, c.read)
		}
		if c.written >= 0 && info.BytesWritten != c.written {
			t.Errorf("%s connection: BytesWritten = %d, want %d", c.name, info.BytesWritten, c.written)
		}
		if c.written < 0 && info.BytesWritten >= int64(len(resp)) {
			t.Errorf("%s connection: BytesWritten = %d: the write was not interrupted", c.name, info.BytesWritten)
		}
	}
	if err := s.serveResult(t); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	if c, err := net.DialTimeout("tcp", s.addr, auditDeadline); err == nil {
		c.Close()
		t.Error("Dial after Close succeeded: the server still accepts")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("Dial after Close: %v, want ECONNREFUSED", err)
	}

	// Both clients get the server's RST: the idle one at once, the
	// blocked one after what was already in its socket buffer.
	if n, err := idle.Read(make([]byte, 1)); !auditIsReset(err) {
		t.Errorf("idle client read: %d, %v; want ECONNRESET", n, err)
	}
	if n, err := auditDrain(blocked, resp[1:]); !auditIsReset(err) {
		t.Errorf("blocked client read: %v after %d bytes; want ECONNRESET", err, n)
	}
}

// ---- 2. the accept back-off ------------------------------------------------------

// auditScriptListener's Accept plays a script: a non-nil entry is returned
// as the error, a nil entry accepts from the wrapped listener (as does every
// call once the script is over). Each successful accept is marked in the
// log, so that it is ordered with the server's log records.
type auditScriptListener struct {
	net.Listener
	log    *auditLog
	mu     sync.Mutex
	script []error
}

func (l *auditScriptListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	var err error
	scripted := len(l.script) > 0
	if scripted {
		err, l.script = l.script[0], l.script[1:]
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	c, err := l.Listener.Accept()
	if err == nil && scripted {
		l.log.add(auditEvent{msg: "accepted"}, "(test) accepted a connection")
	}
	return c, err
}

// TestAuditAcceptBackoffResets: on temporary accept errors Serve backs off
// from 5 ms, doubling; a successful accept resets the back-off, so the next
// error waits 5 ms again. The listener fails with EMFILE (wrapped as net
// wraps it) three times, accepts a connection (which is served), and fails
// once more; the back-offs logged with "accept error; retrying" must be
// 5ms, 10ms, 20ms, then 5ms. The logged values are compared, not elapsed
// time.
func TestAuditAcceptBackoffResets(t *testing.T) {
	checkFDs(t)
	emfile := func() error {
		return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept", syscall.EMFILE)}
	}
	inner := auditListen(t)
	log := newAuditLog(t)
	ln := &auditScriptListener{Listener: inner, log: log, script: []error{emfile(), emfile(), emfile(), nil, emfile()}}
	// Queued in the kernel before Serve starts: the scripted success
	// accepts it.
	c := auditDial(t, inner.Addr().String())

	auditStartLog(t, ln, sockfsm.Config{}, log, func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} })
	auditEcho(t, c, "served between the errors")
	c.Close()

	const retrying = "accept error; retrying"
	evs := log.waitFor(t, "four accept errors to be logged", func(evs []auditEvent) bool {
		n := 0
		for _, ev := range evs {
			if ev.msg == retrying {
				n++
			}
		}
		return n == 4
	})
	var got []string
	for _, ev := range evs {
		switch ev.msg {
		case "accepted":
			got = append(got, "accepted")
		case retrying:
			if err, _ := ev.attrs["err"].Any().(error); !errors.Is(err, syscall.EMFILE) {
				t.Errorf("%q logged with err = %v, want the injected EMFILE", retrying, ev.attrs["err"])
			}
			v, ok := ev.attrs["backoff"]
			if !ok || v.Kind() != slog.KindDuration {
				t.Fatalf("%q logged without a duration attribute \"backoff\" (attributes %v)", retrying, ev.attrs)
			}
			got = append(got, v.Duration().String())
		}
	}
	want := []string{"5ms", "10ms", "20ms", "accepted", "5ms"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("back-offs logged, with the successful accept: %v; want %v", got, want)
	}
}

// ---- 3. the MaxConns slot on early exits --------------------------------------------

// auditNoHalfClose hides every method of a net.Conn but net.Conn's own: it
// cannot half-close, so transport.Wrap refuses it.
type auditNoHalfClose struct{ net.Conn }

// auditFirstListener returns its first accepted connection through wrap.
type auditFirstListener struct {
	net.Listener
	once sync.Once
	wrap func(net.Conn) net.Conn
}

func (l *auditFirstListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.once.Do(func() { c = l.wrap(c) })
	return c, nil
}

// auditFirstHandler returns a NewHandler that calls first for the first
// connection and serves Echo to the others.
func auditFirstHandler(first func() sockfsm.Handler) func(sockfsm.ConnInfo) sockfsm.Handler {
	var once sync.Once
	return func(sockfsm.ConnInfo) sockfsm.Handler {
		var h sockfsm.Handler = sockfsm.Echo{}
		once.Do(func() { h = first() })
		return h
	}
}

// TestAuditMaxConnsSlotReleasedOnEarlyExit: with MaxConns = 1, a connection
// that ends before it is served (NewHandler panics or returns nil, the
// transport cannot wrap its type, its TLS handshake fails) gives its slot
// back: the next connection is served. Were the slot kept, the next client
// would wait in the listen queue forever; its echo is bounded by
// auditDeadline and fails the test instead.
func TestAuditMaxConnsSlotReleasedOnEarlyExit(t *testing.T) {
	cfg := sockfsm.Config{MaxConns: 1}
	// next checks that a new client is served.
	next := func(t *testing.T, s *auditServer) {
		t.Helper()
		c := auditDial(t, s.addr)
		auditEcho(t, c, "the next connection is served")
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("next client: read %q, %v; want EOF", b, err)
		}
		s.closed(t, c)
	}
	// early dials a client that the server drops before serving it, and
	// returns how the client's dial or read ended.
	early := func(t *testing.T, s *auditServer) error {
		t.Helper()
		c, err := net.DialTimeout("tcp", s.addr, auditDeadline)
		if err != nil {
			// The server may have dropped the connection before the
			// dialer saw it established.
			if auditIsReset(err) {
				return err
			}
			t.Fatalf("Dial: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(auditDeadline))
		// Nothing is written: a write that met the server's RST would
		// take the error, and the read would then see EOF.
		_, err = io.ReadAll(c)
		return err
	}

	t.Run("NewHandlerPanics", func(t *testing.T) {
		checkFDs(t)
		s := auditStart(t, auditListen(t), cfg, auditFirstHandler(func() sockfsm.Handler { panic("NewHandler panics") }))
		if err := early(t, s); !auditIsReset(err) {
			t.Fatalf("client of the failed NewHandler: read error %v, want ECONNRESET (aborted)", err)
		}
		next(t, s)
	})
	t.Run("NewHandlerNil", func(t *testing.T) {
		checkFDs(t)
		s := auditStart(t, auditListen(t), cfg, auditFirstHandler(func() sockfsm.Handler { return nil }))
		if err := early(t, s); !auditIsReset(err) {
			t.Fatalf("client of the nil handler: read error %v, want ECONNRESET (aborted)", err)
		}
		next(t, s)
	})
	t.Run("Unwrappable", func(t *testing.T) {
		checkFDs(t)
		ln := &auditFirstListener{Listener: auditListen(t), wrap: func(c net.Conn) net.Conn { return auditNoHalfClose{c} }}
		if _, err := transport.Wrap(auditNoHalfClose{}); !errors.Is(err, transport.ErrUnsupported) {
			t.Fatalf("transport.Wrap(auditNoHalfClose) = %v, want ErrUnsupported: the case tests nothing", err)
		}
		s := auditStart(t, ln, cfg, func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} })
		if err := early(t, s); err != nil && !auditIsReset(err) {
			t.Fatalf("client of the unwrappable connection: read error %v, want EOF or ECONNRESET (closed)", err)
		}
		next(t, s)
	})
	t.Run("TLSHandshakeFails", func(t *testing.T) {
		checkFDs(t)
		ln := tls.NewListener(auditListen(t), &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
		s := auditStart(t, ln, cfg, func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} })
		bad := auditDial(t, s.addr)
		if _, err := bad.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadAll(bad); err != nil && !auditIsReset(err) {
			t.Fatalf("garbage client: read error %v, want EOF or ECONNRESET", err)
		}
		if info := s.closed(t, bad); info.Reason != sockfsm.ReasonHandshake || !errors.Is(info.Err, sockfsm.ErrHandshake) {
			t.Fatalf("garbage client's connection: CloseInfo %+v, want ReasonHandshake", info)
		}

		raw := auditDial(t, s.addr)
		c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
		auditEcho(t, c, "the next connection is served")
		if err := c.CloseWrite(); err != nil { // close_notify: the peer's FIN over TLS
			t.Fatal(err)
		}
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("next client: read %q, %v; want EOF", b, err)
		}
		s.closed(t, raw)
	})
}

// ---- 4. TLS half-close when close_notify cannot be sent ----------------------------

// auditTapConn is the server's TCP connection under TLS: the TCP adapter
// (so that transport.Wrap returns it as is, and the TLS adapter's FIN and
// RST are the TCP adapter's own), with its first Write error recorded and
// CloseWrite (our FIN) reported. Once full is set, a Write blocks as it
// would on a socket whose send buffer is full and whose peer does not read:
// until the write deadline passes, then it fails with a timeout, having
// written nothing.
type auditTapConn struct {
	transport.Stream
	full atomic.Bool

	mu         sync.Mutex
	wdl        time.Time     // the write deadline
	wdlChanged chan struct{} // closed and replaced when wdl changes
	writeErr   error         // the first Write error
	finErr     error
	fin        chan struct{} // closed once CloseWrite has returned
	finOnce    sync.Once
}

func (c *auditTapConn) setWDL(t time.Time) {
	c.mu.Lock()
	c.wdl = t
	close(c.wdlChanged)
	c.wdlChanged = make(chan struct{})
	c.mu.Unlock()
}

func (c *auditTapConn) SetWriteDeadline(t time.Time) error {
	c.setWDL(t)
	return c.Stream.SetWriteDeadline(t)
}

func (c *auditTapConn) SetDeadline(t time.Time) error {
	c.setWDL(t)
	return c.Stream.SetDeadline(t)
}

func (c *auditTapConn) Write(p []byte) (int, error) {
	var n int
	var err error
	if c.full.Load() {
		err = c.blockUntilWriteDeadline()
	} else {
		n, err = c.Stream.Write(p)
	}
	if err != nil {
		c.mu.Lock()
		if c.writeErr == nil {
			c.writeErr = err
		}
		c.mu.Unlock()
	}
	return n, err
}

// blockUntilWriteDeadline waits until the write deadline, which may change
// meanwhile, has passed, and returns the error a socket's Write returns
// then.
func (c *auditTapConn) blockUntilWriteDeadline() error {
	for {
		c.mu.Lock()
		dl, changed := c.wdl, c.wdlChanged
		c.mu.Unlock()
		var expired <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.ErrDeadlineExceeded}
			}
			timer := time.NewTimer(d)
			defer timer.Stop()
			expired = timer.C
		}
		select {
		case <-expired:
		case <-changed:
		}
	}
}

func (c *auditTapConn) CloseWrite() error {
	err := c.Stream.CloseWrite()
	c.finOnce.Do(func() {
		c.mu.Lock()
		c.finErr = err
		c.mu.Unlock()
		close(c.fin)
	})
	return err
}

// auditTapListener accepts auditTapConns and hands each to the test.
type auditTapListener struct {
	net.Listener
	conns chan *auditTapConn
}

func (l *auditTapListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	tc.SetWriteBuffer(1 << 20) // the response fits, although the client does not read
	tap := &auditTapConn{Stream: transport.TCP(tc), wdlChanged: make(chan struct{}), fin: make(chan struct{})}
	select {
	case l.conns <- tap:
	default:
	}
	return tap, nil
}

// TestAuditTLSCloseWriteWithoutCloseNotify: over TLS the half-close sends
// close_notify and then a TCP FIN. When close_notify cannot be sent (the
// client does not read, the server's send buffer is full, and tls.Conn's
// fixed 5 s write deadline for the alert passes), the FIN is sent all the
// same and the close stays graceful: the client, reading at last, gets
// every byte of the response and then end of file, never a reset, and the
// server reports a graceful close.
//
// The client really does not read: the response sits in the kernel's
// buffers until the FIN. The full send buffer is emulated under TLS
// (auditTapConn): on Linux a write as small as the 24-byte alert is
// appended to the unsent tail of the socket's queue without regard to
// SO_SNDBUF, so a really full buffer cannot be arranged reliably. The
// test takes a little over 5 s of real time: tls.Conn's deadline.
func TestAuditTLSCloseWriteWithoutCloseNotify(t *testing.T) {
	if testing.Short() {
		t.Skip("takes over 5 s: tls.Conn gives close_notify a fixed 5 s write deadline")
	}
	checkFDs(t)
	resp := auditPattern(128 << 10)
	tap := &auditTapListener{Listener: auditListen(t), conns: make(chan *auditTapConn, 1)}
	ln := tls.NewListener(tap, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	s := auditStart(t, ln, sockfsm.Config{IdleTimeout: time.Minute, WriteTimeout: time.Minute, LingerTimeout: time.Minute},
		func(sockfsm.ConnInfo) sockfsm.Handler {
			return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
				switch string(p) {
				case "fill":
					c.Write(resp)
				case "close":
					c.Close()
				}
			})
		})

	raw := auditDial(t, s.addr)
	raw.SetDeadline(time.Now().Add(auditDeadline + 5*time.Second))
	client := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
	if err := client.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	var sc *auditTapConn
	select {
	case sc = <-tap.conns:
	case <-time.After(auditDeadline):
		t.Fatal("the server did not accept the connection")
	}

	if _, err := client.Write([]byte("fill")); err != nil {
		t.Fatal(err)
	}
	s.waitFor(t, "the response to be flushed", func() bool { return s.sawEventLocked(raw, fsm.Flushed) })
	// The response is in the kernel's buffers; from now on the server's
	// send buffer takes nothing more.
	sc.full.Store(true)
	if _, err := client.Write([]byte("close")); err != nil {
		t.Fatal(err)
	}
	// The handler's Close: close_notify waits 5 s for room, in vain; then
	// the FIN is queued behind the response. Unless the server aborts.
	timeout := time.NewTimer(auditDeadline + 5*time.Second)
	defer timeout.Stop()
	for fin := false; !fin; {
		s.mu.Lock()
		info, closed := s.closes[raw.LocalAddr().String()]
		ch := s.changed
		s.mu.Unlock()
		if closed {
			t.Fatalf("the server closed the connection instead of half-closing it: CloseInfo %+v", info)
		}
		select {
		case <-sc.fin:
			fin = true
		case <-ch:
		case <-timeout.C:
			t.Fatal("the server did not half-close")
		}
	}
	sc.mu.Lock()
	writeErr, finErr := sc.writeErr, sc.finErr
	sc.mu.Unlock()
	if !errors.Is(writeErr, os.ErrDeadlineExceeded) {
		t.Fatalf("the server's close_notify: write error %v, want a deadline error: the scenario was not reached", writeErr)
	}
	if finErr != nil {
		t.Fatalf("the server's TCP CloseWrite: %v", finErr)
	}

	// The client reads at last: the whole response, then end of file (a
	// TLS layer may call it unexpected: no close_notify came), not a reset.
	got, err := io.ReadAll(client)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("client read: %v (reset: %v) after %d bytes; want the server's FIN", err, auditIsReset(err), len(got))
	}
	if !bytes.Equal(got, resp) {
		t.Fatalf("client received %d bytes, want the %d-byte response", len(got), len(resp))
	}
	t.Logf("client read the %d-byte response, then end of file (unexpected: %v)", len(got), err != nil)
	if n, err := raw.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("client's TCP read after the response: %d, %v; want 0, EOF (the server's FIN)", n, err)
	}
	client.Close()
	info := s.closed(t, raw)
	if info.Reason != sockfsm.ReasonHandlerClose || info.Aborted() || info.Err != nil || !info.PeerFIN ||
		info.BytesWritten != int64(len(resp)) {
		t.Errorf("CloseInfo %+v; want ReasonHandlerClose, graceful, no error, the peer's FIN, BytesWritten %d", info, len(resp))
	}
}

// ---- 5. MaxPendingOutput at its boundary ----------------------------------------------

// TestAuditMaxPendingOutputBoundary: MaxPendingOutput bytes fit, one more do
// not. A handler that writes exactly MaxPendingOutput bytes in one callback
// gets n = len, err = nil, and one more byte in the same callback gets 0,
// ErrOutputFull; a single Write of MaxPendingOutput+1 bytes queues
// MaxPendingOutput of them and returns ErrOutputFull. Either way the client
// receives exactly MaxPendingOutput bytes.
func TestAuditMaxPendingOutputBoundary(t *testing.T) {
	const limit = 100_003 // not a power of two, nor a multiple of the read buffer
	type write struct {
		n   int
		err error
	}
	for _, tc := range []struct {
		name   string
		writes []int // the sizes written, in one callback
		want   []write
	}{
		{"ExactThenOne", []int{limit, 1}, []write{{limit, nil}, {0, sockfsm.ErrOutputFull}}},
		{"OneOver", []int{limit + 1}, []write{{limit, sockfsm.ErrOutputFull}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkFDs(t)
			resp := auditPattern(limit + 1)
			results := make(chan []write, 1)
			s := auditStart(t, auditListen(t), sockfsm.Config{MaxPendingOutput: limit}, func(sockfsm.ConnInfo) sockfsm.Handler {
				done := false
				return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
					if done {
						return
					}
					done = true
					var got []write
					off := 0
					for _, size := range tc.writes {
						n, err := c.Write(resp[off : off+size])
						got = append(got, write{n, err})
						off += n
					}
					results <- got
				})
			})
			c := auditDial(t, s.addr)
			if _, err := c.Write([]byte("go")); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("client read: %v after %d bytes; want EOF", err, len(got))
			}
			var ws []write
			select {
			case ws = <-results:
			case <-time.After(auditDeadline):
				t.Fatal("the handler was not called")
			}
			if len(ws) != len(tc.want) {
				t.Fatalf("writes %v, want %v", ws, tc.want)
			}
			for i, w := range ws {
				if w.n != tc.want[i].n || !errors.Is(w.err, tc.want[i].err) || (tc.want[i].err == nil && w.err != nil) {
					t.Errorf("Write %d of %d bytes = %d, %v; want %d, %v", i+1, tc.writes[i], w.n, w.err, tc.want[i].n, tc.want[i].err)
				}
			}
			if !bytes.Equal(got, resp[:limit]) {
				t.Errorf("client received %d bytes, want exactly the first MaxPendingOutput = %d", len(got), limit)
			}
			if info := s.closed(t, c); info.BytesWritten != limit || info.Aborted() {
				t.Errorf("CloseInfo %+v; want BytesWritten %d, graceful", info, limit)
			}
		})
	}
}

// ---- 6. the idle timer after ignored input ---------------------------------------------

// TestAuditIdleTimeoutAfterIgnoredInput: input counts as activity even when
// the handler answers nothing. A client sends a byte every IdleTimeout/4,
// for twice IdleTimeout in all, to a handler that ignores input, and then
// goes quiet: the connection is closed for the idle timeout, gracefully (the
// client reads EOF, not a reset), and only once the bytes stopped: every
// byte sent was read while Receiving and handed to the handler, none
// discarded by a linger that began while they were still arriving.
//
// The client checks its own pacing: if it was itself descheduled for more
// than IdleTimeout/2 between two bytes, the attempt proves nothing and is
// run again (at most three attempts).
func TestAuditIdleTimeoutAfterIgnoredInput(t *testing.T) {
	checkFDs(t)
	const (
		idle      = 200 * time.Millisecond
		every     = idle / 4
		bytesSent = 8 // 2 × IdleTimeout of input
	)
	var mu sync.Mutex
	handed := map[string]int{} // bytes handed to OnData, per connection
	s := auditStart(t, auditListen(t), sockfsm.Config{IdleTimeout: idle, LingerTimeout: auditDeadline},
		func(info sockfsm.ConnInfo) sockfsm.Handler {
			k := info.RemoteAddr.String()
			return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
				mu.Lock()
				handed[k] += len(p)
				mu.Unlock()
			})
		})
	for attempt := 1; ; attempt++ {
		c := auditDial(t, s.addr)
		paced := true
		last := time.Now()
		for i := range bytesSent {
			if i > 0 {
				time.Sleep(every) // pacing the client's input, not synchronization
			}
			if now := time.Now(); now.Sub(last) > idle/2 {
				paced = false
			}
			if _, err := c.Write([]byte{'x'}); err != nil {
				t.Fatalf("client write %d: %v (the server closed while input was arriving)", i+1, err)
			}
			last = time.Now()
		}
		b, err := io.ReadAll(c)
		if err != nil || len(b) != 0 {
			t.Fatalf("client read: %q, %v (reset: %v); want EOF (the server's FIN)", b, err, auditIsReset(err))
		}
		c.Close()
		info := s.closed(t, c)
		if !paced && attempt < 3 {
			t.Logf("attempt %d: the client was descheduled between two bytes; trying again", attempt)
			continue
		}
		mu.Lock()
		n := handed[c.LocalAddr().String()]
		mu.Unlock()
		if info.Reason != sockfsm.ReasonIdleTimeout || info.Aborted() || info.Err != nil {
			t.Errorf("CloseInfo %+v; want ReasonIdleTimeout, graceful", info)
		}
		if info.BytesRead != bytesSent || info.Discarded != 0 || n != bytesSent {
			t.Errorf("BytesRead = %d, Discarded = %d, handed to the handler %d; want %d, 0, %d: "+
				"the idle timeout fired while input was arriving", info.BytesRead, info.Discarded, n, bytesSent, bytesSent)
		}
		return
	}
}
