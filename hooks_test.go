package sockfsm_test

// Tests of the hooks a metrics package needs beside OnStateChange and
// OnClose: OnAccept (a connection enters Accepted), OnAcceptError, and
// (in hooks_internal_test.go) OnMaxConnsWait.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"testing"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
	"github.com/sockfsm/sockfsm/transport"
)

// hookLog records, per connection, the hooks called, in order.
type hookLog struct {
	mu    sync.Mutex
	calls map[uint64][]string
}

func (h *hookLog) add(id uint64, s string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.calls == nil {
		h.calls = map[uint64][]string{}
	}
	h.calls[id] = append(h.calls[id], s)
}

// TestOnAcceptOpensEveryConnection: each connection is seen by OnAccept
// once, before any other hook; its first transition leaves Accepted; it
// ends with one OnClose. Replaying the hooks as a gauge per state leaves
// every gauge at zero once the connections closed, and never negative.
func TestOnAcceptOpensEveryConnection(t *testing.T) {
	checkFDs(t)
	var log hookLog
	srv := &sockfsm.Server{
		Config: sockfsm.Config{
			OnAccept: func(c sockfsm.ConnInfo) { log.add(c.ID, "accept") },
			OnStateChange: func(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
				log.add(c.ID, fmt.Sprintf("%s %s %s", from, ev, to))
			},
			OnClose: func(c sockfsm.ConnInfo, info sockfsm.CloseInfo) { log.add(c.ID, "close "+info.Reason.String()) },
		},
		NewHandler: conntest.Always(sockfsm.Echo{}),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	const n = 5
	for range n {
		c := dial(t, "tcp", ln.Addr().String())
		conntest.MustWrite(t, c, []byte("this is a test"))
		conntest.CloseWrite(t, c)
		if got := conntest.ReadToEOF(t, c); string(got) != "this is a test" {
			t.Fatalf("echo = %q", got)
		}
		c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Fatalf("Serve = %v", err)
	}

	log.mu.Lock()
	defer log.mu.Unlock()
	if len(log.calls) != n {
		t.Fatalf("hooks heard of %d connections, want %d: %v", len(log.calls), n, log.calls)
	}
	gauge := map[fsm.State]int{}
	for id, calls := range log.calls {
		if calls[0] != "accept" {
			t.Errorf("conn %d: first hook %q, want accept: %v", id, calls[0], calls)
		}
		if want := "accepted start receiving"; len(calls) < 2 || calls[1] != want {
			t.Errorf("conn %d: second hook not %q: %v", id, want, calls)
		}
		if last := calls[len(calls)-1]; last != "close peer-closed" {
			t.Errorf("conn %d: last hook %q, want close peer-closed: %v", id, last, calls)
		}
		opened, closed := 0, 0
		for _, c := range calls {
			var from, ev, to string
			switch {
			case c == "accept":
				opened++
				gauge[fsm.Accepted]++
			case len(c) > 6 && c[:6] == "close ":
				closed++
			default:
				if _, err := fmt.Sscan(c, &from, &ev, &to); err != nil {
					t.Fatalf("bad record %q", c)
				}
				f, _ := fsm.ParseState(from)
				s, _ := fsm.ParseState(to)
				gauge[f]--
				gauge[s]++
				if gauge[f] < 0 {
					t.Errorf("conn %d: left %s without entering it: %v", id, f, calls)
				}
			}
		}
		if opened != 1 || closed != 1 {
			t.Errorf("conn %d: OnAccept %d times, OnClose %d times, want 1 and 1", id, opened, closed)
		}
	}
	for s, v := range gauge {
		if s != fsm.Closed && v != 0 {
			t.Errorf("gauge %s = %d after every connection closed, want 0", s, v)
		}
	}
	if gauge[fsm.Closed] != n {
		t.Errorf("%d connections reached Closed, want %d", gauge[fsm.Closed], n)
	}
}

// TestOnAcceptPanicAborts: a panicking OnAccept aborts its connection with
// ReasonHandlerPanic, reported to OnClose as to the caller.
func TestOnAcceptPanicAborts(t *testing.T) {
	infos := make(chan sockfsm.CloseInfo, 1)
	client, tr := transport.Pipe()
	defer client.Close()
	cfg := sockfsm.Config{
		OnAccept: func(sockfsm.ConnInfo) { panic("boom") },
		OnClose:  func(_ sockfsm.ConnInfo, info sockfsm.CloseInfo) { infos <- info },
	}
	info, err := sockfsm.ServeConn(context.Background(), tr, sockfsm.Echo{}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if info.Reason != sockfsm.ReasonHandlerPanic {
		t.Errorf("Reason = %s, want handler-panic", info.Reason)
	}
	var perr *sockfsm.PanicError
	if !errors.As(info.Err, &perr) || perr.Value != "boom" {
		t.Errorf("Err = %v, want the PanicError of boom", info.Err)
	}
	if got := <-infos; got.Reason != sockfsm.ReasonHandlerPanic {
		t.Errorf("OnClose heard %s", got.Reason)
	}
}

// errListener returns its errors from Accept, one per call, then
// net.ErrClosed.
type errListener struct {
	mu   sync.Mutex
	errs []error
}

func (l *errListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) == 0 {
		return nil, net.ErrClosed
	}
	err := l.errs[0]
	l.errs = l.errs[1:]
	return nil, err
}
func (l *errListener) Close() error   { return nil }
func (l *errListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// TestOnAcceptError: Serve reports every error Accept returns, the
// temporary ones it retries and the one that ends it; Listener.Accept
// reports the error it returns; neither reports the closed listener of a
// Shutdown.
func TestOnAcceptError(t *testing.T) {
	var mu sync.Mutex
	var got []error
	cfg := sockfsm.Config{OnAcceptError: func(err error) {
		mu.Lock()
		got = append(got, err)
		mu.Unlock()
	}}
	fatal := errors.New("listener broke")
	srv := &sockfsm.Server{Config: cfg, NewHandler: conntest.Always(sockfsm.Echo{})}
	err := srv.Serve(&errListener{errs: []error{syscall.EMFILE, syscall.ECONNABORTED, fatal}})
	if !errors.Is(err, fatal) {
		t.Fatalf("Serve = %v, want %v", err, fatal)
	}
	mu.Lock()
	if len(got) != 3 || got[0] != syscall.EMFILE || got[1] != syscall.ECONNABORTED || got[2] != fatal {
		t.Errorf("OnAcceptError heard %v, want EMFILE, ECONNABORTED, %v", got, fatal)
	}
	got = nil
	mu.Unlock()

	l := sockfsm.NewListener(&errListener{errs: []error{syscall.EMFILE}}, cfg)
	if _, err := l.Accept(); !errors.Is(err, syscall.EMFILE) {
		t.Errorf("Listener.Accept = %v, want EMFILE", err)
	}
	mu.Lock()
	if len(got) != 1 || got[0] != syscall.EMFILE {
		t.Errorf("OnAcceptError heard %v from Listener.Accept, want EMFILE", got)
	}
	got = nil
	mu.Unlock()

	// The same with a Prelude, whose accept loop runs on a goroutine of
	// its own (it may go on to the listener's next error meanwhile).
	pcfg := cfg
	pcfg.Prelude = func(c net.Conn) (net.Conn, error) { return c, nil }
	pl := sockfsm.NewListener(&errListener{errs: []error{syscall.EMFILE}}, pcfg)
	if _, err := pl.Accept(); !errors.Is(err, syscall.EMFILE) {
		t.Errorf("Listener.Accept with a Prelude = %v, want EMFILE", err)
	}
	pl.Close()
	mu.Lock()
	if len(got) == 0 || got[0] != syscall.EMFILE {
		t.Errorf("OnAcceptError heard %v from Listener.Accept with a Prelude, want EMFILE first", got)
	}
	got = nil
	mu.Unlock()

	// A real listener closed by Shutdown: Serve returns ErrServerClosed
	// and reports nothing.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv = &sockfsm.Server{Config: cfg, NewHandler: conntest.Always(sockfsm.Echo{})}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	c := dial(t, "tcp", ln.Addr().String()) // Serve is accepting once this is served
	conntest.MustWrite(t, c, []byte("x"))
	conntest.ReadFull(t, c, 1)
	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Fatalf("Serve = %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 0 {
		t.Errorf("OnAcceptError heard %v after Shutdown, want nothing", got)
	}
}
