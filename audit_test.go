package sockfsm_test

// Tests for the places an audit found the suite blind, those that only the
// goroutine driver can run (they wrap the listener or use TLS): the accept
// back-off's reset after a successful accept, the MaxConns slot on an early
// exit of a connection, the TLS half-close when close_notify cannot be
// sent. The audit's other tests (Server.Close, the MaxConns slot when
// NewHandler fails, MaxPendingOutput at its exact boundary, the idle timer
// after input the handler ignores) are in internal/drivertest, for every
// driver.
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

// ---- 1. the accept back-off ------------------------------------------------------

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

// ---- 2. the MaxConns slot on early exits --------------------------------------------

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

// TestAuditMaxConnsSlotReleasedOnEarlyExit: with MaxConns = 1, a connection
// that ends before it is served (the transport cannot wrap its type, its TLS
// handshake fails) gives its slot back: the next connection is served. Were
// the slot kept, the next client would wait in the listen queue forever; its
// echo is bounded by auditDeadline and fails the test instead. (When
// NewHandler panics or returns nil: drivertest's
// MaxConnsSlotReleasedOnEarlyExit, for every driver. These two cases wrap
// the listener, which only the goroutine driver serves.)
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

// ---- 3. TLS half-close when close_notify cannot be sent ----------------------------

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
