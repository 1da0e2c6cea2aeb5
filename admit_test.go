package sockfsm_test

// Tests of what happens to a connection before it is served: the
// per-address limit (Config.MaxConnsPerIP), the prelude (Config.Prelude)
// and the refusals both report (Config.OnRefuse).

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// refusals records Config.OnRefuse's calls.
type refusals struct {
	mu   sync.Mutex
	list []refusal
}

type refusal struct {
	remote net.Addr
	reason error
}

func (r *refusals) hook(remote net.Addr, reason error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, refusal{remote, reason})
}

func (r *refusals) all() []refusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]refusal(nil), r.list...)
}

// wait waits (bounded) until n refusals were reported, and returns them:
// the client sees the close before OnRefuse is called.
func (r *refusals) wait(n int) []refusal {
	for end := time.Now().Add(clientDeadline); len(r.all()) < n && time.Now().Before(end); {
		time.Sleep(time.Millisecond)
	}
	return r.all()
}

// count returns the number of refusals whose reason matches target.
func (r *refusals) count(target error) int {
	n := 0
	for _, f := range r.all() {
		if errors.Is(f.reason, target) {
			n++
		}
	}
	return n
}

// dialFrom connects from the loopback address src (127.0.0.x: Linux routes
// the whole 127/8 to lo).
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: clientDeadline}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("Dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(clientDeadline))
	return c
}

// echoOnce writes msg and reads its echo back on c.
func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	conntest.MustWrite(t, c, []byte(msg))
	if got := string(conntest.ReadFull(t, c, len(msg))); got != msg {
		t.Fatalf("echo %q, want %q", got, msg)
	}
}

// wantClosedUnserved checks that the server closed c without serving it:
// what c wrote is not echoed, and reading ends (FIN, or RST if the server
// closed with c's bytes unread).
func wantClosedUnserved(t *testing.T, c net.Conn) {
	t.Helper()
	c.Write([]byte("ping")) // may fail already: the server closed
	wantClosedSilent(t, c)
}

// wantClosedSilent checks that the server closed c, which sent nothing,
// without sending anything.
func wantClosedSilent(t *testing.T, c net.Conn) {
	t.Helper()
	n, err := conntest.Drain(c, nil)
	if n != 0 {
		t.Fatalf("a refused connection got %d bytes back: it was served", n)
	}
	if err != io.EOF && !conntest.IsReset(err) {
		t.Fatalf("a refused connection's read ended with %v, want EOF or a reset", err)
	}
}

func TestMaxConnsPerIP(t *testing.T) {
	checkFDs(t)
	const limit = 2
	var ref refusals
	var mu sync.Mutex
	handlers := 0
	ts := startServer(t, "tcp", "127.0.0.1:0", sockfsm.Config{MaxConnsPerIP: limit, OnRefuse: ref.hook},
		func(sockfsm.ConnInfo) sockfsm.Handler {
			mu.Lock()
			handlers++
			mu.Unlock()
			return sockfsm.Echo{}
		})

	var held []net.Conn
	for i := range limit {
		c := dialFrom(t, "127.0.0.2", ts.addr)
		echoOnce(t, c, "held"+string(rune('0'+i)))
		held = append(held, c)
	}
	over := dialFrom(t, "127.0.0.2", ts.addr)
	wantClosedUnserved(t, over)
	conntest.WaitUntil(t, "the refusal reported", func() bool { return len(ref.all()) == 1 })
	f := ref.all()[0]
	if !errors.Is(f.reason, sockfsm.ErrTooManyConnsFromIP) {
		t.Errorf("refused with %v, want ErrTooManyConnsFromIP", f.reason)
	}
	if f.remote.String() != over.LocalAddr().String() {
		t.Errorf("OnRefuse's remote is %v, want the refused client %v", f.remote, over.LocalAddr())
	}
	if logs := ts.logs.String(); !containsOnce(logs, "connection refused") {
		t.Errorf("the refusal is not logged exactly once:\n%s", logs)
	}

	// Another address is not affected, and the held ones still work.
	other := dialFrom(t, "127.0.0.3", ts.addr)
	echoOnce(t, other, "other")
	for _, c := range held {
		echoOnce(t, c, "still")
	}

	// Closing one releases its slot.
	conntest.CloseWrite(t, held[0])
	conntest.ReadToEOF(t, held[0])
	ts.closes.wait(t, conntest.Key(held[0]))
	again := dialFrom(t, "127.0.0.2", ts.addr)
	echoOnce(t, again, "again")

	if n := len(ref.all()); n != 1 {
		t.Errorf("%d refusals, want 1: %v", n, ref.all())
	}
	mu.Lock()
	defer mu.Unlock()
	if want := limit + 2; handlers != want {
		t.Errorf("NewHandler was called %d times, want %d: a refused connection must have no handler", handlers, want)
	}
}

func containsOnce(s, sub string) bool {
	i := indexOf(s, sub)
	return i >= 0 && indexOf(s[i+len(sub):], sub) < 0
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

func TestListenerMaxConnsPerIP(t *testing.T) {
	checkFDs(t)
	var ref refusals
	logs := newTestWriter(t)
	ln, err := sockfsm.Listen("tcp", "127.0.0.1:0", sockfsm.Config{MaxConnsPerIP: 1, OnRefuse: ref.hook,
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	var served []net.Conn
	defer func() {
		for _, c := range served {
			c.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		ln.Shutdown(ctx)
		for range accepted {
		}
	}()
	a := dialFrom(t, "127.0.0.2", ln.Addr().String())
	served = append(served, a)
	select {
	case <-accepted:
	case <-time.After(clientDeadline):
		t.Fatal("the first connection was not accepted")
	}
	b := dialFrom(t, "127.0.0.2", ln.Addr().String())
	wantClosedUnserved(t, b)
	c := dialFrom(t, "127.0.0.3", ln.Addr().String())
	served = append(served, c)
	select {
	case got := <-accepted:
		if got.RemoteAddr().String() != c.LocalAddr().String() {
			t.Errorf("accepted %v, want the client from 127.0.0.3 (%v)", got.RemoteAddr(), c.LocalAddr())
		}
	case <-time.After(clientDeadline):
		t.Fatal("the connection from 127.0.0.3 was not accepted")
	}
	if n := ref.count(sockfsm.ErrTooManyConnsFromIP); n != 1 {
		t.Errorf("%d refusals for ErrTooManyConnsFromIP, want 1", n)
	}
}

// TestListenerPrelude: on the net.Conn face too, a peer that never
// finishes its prelude stalls no Accept, a bad prelude is refused, and
// Close closes a connection still in its prelude without counting it.
func TestListenerPrelude(t *testing.T) {
	checkFDs(t)
	var ref refusals
	logs := newTestWriter(t)
	ln, err := sockfsm.Listen("tcp", "127.0.0.1:0", sockfsm.Config{Prelude: bangPrelude, OnRefuse: ref.hook,
		PreludeTimeout: time.Hour, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	accepted := make(chan net.Conn, 4)
	acceptErr := make(chan error, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			accepted <- c
		}
	}()
	silent := dial(t, "tcp", addr)
	bad := dial(t, "tcp", addr)
	conntest.MustWrite(t, bad, []byte("?"))
	wantClosedUnserved(t, bad)
	good := dial(t, "tcp", addr)
	conntest.MustWrite(t, good, []byte("!hello"))
	var sc net.Conn
	select {
	case sc = <-accepted:
	case <-time.After(clientDeadline):
		t.Fatal("Accept stalled behind a silent prelude")
	}
	if sc.RemoteAddr().String() != good.LocalAddr().String() {
		t.Fatalf("Accept returned %v, want the good client %v", sc.RemoteAddr(), good.LocalAddr())
	}
	sc.SetReadDeadline(time.Now().Add(clientDeadline))
	if got := conntest.ReadFull(t, sc, 5); string(got) != "hello" {
		t.Fatalf("read %q after the prelude, want %q", got, "hello")
	}
	sc.Close()
	if r := ref.wait(1); len(r) != 1 || !errors.Is(r[0].reason, sockfsm.ErrPrelude) {
		t.Errorf("refusals %v, want the bad one, ErrPrelude", r)
	}

	ln.Close()
	select {
	case err := <-acceptErr:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(clientDeadline):
		t.Fatal("Accept did not return after Close")
	}
	wantClosedSilent(t, silent) // Close cut its hour-long prelude short
	if n := len(ref.all()); n != 1 {
		t.Errorf("%d refusals after Close, want 1: a prelude cut short by Close is not a refusal", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	conntest.CloseWrite(t, good)
	if err := ln.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func TestValidateAdmission(t *testing.T) {
	for _, cfg := range []sockfsm.Config{{MaxConnsPerIP: -1}, {PreludeTimeout: -1}} {
		if err := cfg.Validate(); !errors.Is(err, sockfsm.ErrInvalidConfig) {
			t.Errorf("Validate(%+v) = %v, want ErrInvalidConfig", cfg, err)
		}
	}
}

// bangPrelude is a prelude that wants one byte, '!', before the connection
// is served.
func bangPrelude(c net.Conn) (net.Conn, error) {
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return nil, err
	}
	if b[0] != '!' {
		return nil, errors.New("no bang")
	}
	return c, nil
}

// TestPreludeOffTheAcceptLoop: a peer that never finishes its prelude
// delays nobody: the next connections are accepted and served while it
// waits, and it is refused at PreludeTimeout; a bad prelude is refused at
// once; both are reported with ErrPrelude and logged once each.
func TestPreludeOffTheAcceptLoop(t *testing.T) {
	checkFDs(t)
	var ref refusals
	var mu sync.Mutex
	var infos []sockfsm.ConnInfo
	ts := startServer(t, "tcp", "127.0.0.1:0",
		sockfsm.Config{Prelude: bangPrelude, PreludeTimeout: 500 * time.Millisecond, OnRefuse: ref.hook},
		func(ci sockfsm.ConnInfo) sockfsm.Handler {
			mu.Lock()
			infos = append(infos, ci)
			mu.Unlock()
			return sockfsm.Echo{}
		})
	silent := dial(t, "tcp", ts.addr)
	for i := range 3 {
		c := dial(t, "tcp", ts.addr)
		conntest.MustWrite(t, c, []byte("!"))
		echoOnce(t, c, "served"+string(rune('0'+i)))
	}
	if n := len(ref.all()); n != 0 {
		t.Fatalf("refusals before the silent peer's deadline: %v", ref.all())
	}
	bad := dial(t, "tcp", ts.addr)
	conntest.MustWrite(t, bad, []byte("?"))
	wantClosedUnserved(t, bad)
	wantClosedSilent(t, silent) // at PreludeTimeout
	conntest.WaitUntil(t, "both refusals reported", func() bool { return len(ref.all()) == 2 })
	if n := ref.count(sockfsm.ErrPrelude); n != 2 {
		t.Errorf("%d refusals match ErrPrelude, want 2: %v", n, ref.all())
	}
	if n := ref.count(os.ErrDeadlineExceeded); n != 1 {
		t.Errorf("%d refusals match os.ErrDeadlineExceeded, want 1 (the silent peer's): %v", n, ref.all())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(infos) != 3 {
		t.Errorf("NewHandler called %d times, want 3", len(infos))
	}
}

// TestShutdownCutsPrelude: Shutdown does not wait for a peer in its
// prelude to time out, and does not count it as refused.
func TestShutdownCutsPrelude(t *testing.T) {
	checkFDs(t)
	var ref refusals
	srv := &sockfsm.Server{
		Config:     sockfsm.Config{Prelude: bangPrelude, PreludeTimeout: time.Hour, OnRefuse: ref.hook},
		NewHandler: conntest.Always(sockfsm.Echo{}),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	silent := dial(t, "tcp", ln.Addr().String())
	busy := dial(t, "tcp", ln.Addr().String())
	conntest.MustWrite(t, busy, []byte("!"))
	echoOnce(t, busy, "x")
	conntest.CloseWrite(t, busy)
	conntest.ReadToEOF(t, busy)

	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v (it waited for the prelude's hour?)", err)
	}
	if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve: %v", err)
	}
	wantClosedSilent(t, silent)
	if r := ref.all(); len(r) != 0 {
		t.Errorf("Shutdown's cut counted as refusals: %v", r)
	}
}

func TestRefusalReason(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{sockfsm.ErrTooManyConnsFromIP, "too-many-conns-from-ip"},
		{errors.Join(sockfsm.ErrProxyHeader, io.ErrUnexpectedEOF), "proxy-header"},
		{errors.Join(sockfsm.ErrPrelude, errors.New("no bang")), "prelude"},
		{errors.New("something else"), "other"},
	} {
		if got := sockfsm.RefusalReason(c.err); got != c.want {
			t.Errorf("RefusalReason(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}
