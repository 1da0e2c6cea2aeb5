package loop

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// fakeServer returns a server on a fake kernel in w as Serve lays it out:
// an accepting loop holding an acceptor on the fake listener, and one
// serving loop, returned; not yet settled.
func fakeServer(t *testing.T, w *world, cfg sockfsm.Config) (*Server, *eventLoop, *acceptor) {
	t.Helper()
	cfg.Logger = discardLogger
	srv := &Server{Config: cfg, NewHandler: conntest.Always(sockfsm.Echo{}), Loops: 1}
	st := &srv.impl
	st.newKernel = w.newKernel
	st.mu.Lock()
	st.initLocked(srv)
	if err := st.makeLoops(1); err != nil {
		t.Fatal(err)
	}
	st.nacceptors++
	st.mu.Unlock()
	a := &acceptor{fd: listenFD, tcp: true, laddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, done: make(chan error, 1)}
	st.loops[0].postAcceptor(a)
	return srv, st.serving[0], a
}

// accepting returns the accepting loop's fake kernel of l's server.
func accepting(l *eventLoop) *fakeKernel { return l.s.loops[0].k.(*fakeKernel) }

// settleLoop turns every loop of l's server until each one's epoll_wait
// would block, within a bound.
func settleLoop(t *testing.T, l *eventLoop) {
	t.Helper()
	for range maxSettleTurns {
		idle := true
		for _, x := range l.s.loops {
			x.turn()
			k := x.k.(*fakeKernel)
			if len(k.w.problems) > 0 {
				t.Fatalf("the loop did what no kernel allows: %q", k.w.problems)
			}
			idle = idle && k.idle
		}
		if idle {
			return
		}
	}
	t.Fatalf("the loops did not settle in %d turns", maxSettleTurns)
}

// TestAcceptCalls: connections that come one at a time cost one accept4
// each, none failing with EAGAIN; a burst is taken in a few turns of the
// accepting loop (its batch doubles while the queue builds), with one
// EAGAIN at most.
func TestAcceptCalls(t *testing.T) {
	w := newWorld()
	_, l, _ := fakeServer(t, w, sockfsm.Config{})
	k := accepting(l)
	connect := func() { w.dial(64, 64) }
	settleLoop(t, l)
	const single = 10
	for range single {
		connect()
		settleLoop(t, l)
	}
	if l.n != single || k.accepts != single {
		t.Errorf("%d connections one at a time: %d open after %d accept calls, want %d and %d", single, l.n, k.accepts, single, single)
	}
	const burst, maxTurns = 100, 8 // 1+2+4+...+64 = 127 in 7 turns
	for range burst {
		connect()
	}
	before, turns := k.accepts, 0
	for ; len(w.backlog) > 0 && turns < burst; turns++ {
		l.s.loops[0].turn()
	}
	settleLoop(t, l)
	if l.n != single+burst {
		t.Fatalf("after a burst of %d: %d open, want %d", burst, l.n, single+burst)
	}
	if got := k.accepts - before; got > burst+1 {
		t.Errorf("a burst of %d: %d accept calls, want at most %d", burst, got, burst+1)
	}
	if turns > maxTurns {
		t.Errorf("a burst of %d took %d turns of the accepting loop, want at most %d", burst, turns, maxTurns)
	}
}

// TestAcceptBackoff: EMFILE and ENFILE from accept stop accepting (the
// listener leaves the epoll set, so the loop does not spin on it) for 5 ms,
// doubling on each consecutive error; then accepting resumes, and a
// success resets the back-off.
func TestAcceptBackoff(t *testing.T) {
	w := newWorld()
	var acceptErrs []error
	_, l, _ := fakeServer(t, w, sockfsm.Config{OnAcceptError: func(err error) { acceptErrs = append(acceptErrs, err) }})
	k := accepting(l)
	connect := func() *fsock { return w.dial(64, 64) }
	s1 := connect()
	w.acceptErrs = []error{unix.EMFILE, unix.ENFILE, unix.EMFILE}
	var waits []time.Duration
	for _, want := range []time.Duration{5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond} {
		settleLoop(t, l)
		if k.interest[listenFD] != 0 {
			t.Fatal("the listener is still watched during the back-off")
		}
		waits = append(waits, k.lastWait)
		if k.lastWait != want {
			t.Fatalf("back-offs %v, want 5ms, 10ms, 20ms", waits)
		}
		w.now = w.now.Add(k.lastWait)
	}
	settleLoop(t, l)
	if s1.owner == nil || l.n != 1 {
		t.Fatal("the connection was not accepted after the back-off")
	}
	if k.interest[listenFD] == 0 {
		t.Fatal("the listener is not watched again")
	}
	if len(acceptErrs) != 3 || !errors.Is(acceptErrs[0], unix.EMFILE) || !errors.Is(acceptErrs[1], unix.ENFILE) {
		t.Errorf("OnAcceptError heard %v, want EMFILE, ENFILE, EMFILE", acceptErrs)
	}
	// A success reset the back-off: the next error waits 5 ms again.
	connect()
	w.acceptErrs = []error{unix.EMFILE}
	settleLoop(t, l)
	if k.interest[listenFD] != 0 {
		t.Fatal("the listener is still watched during the back-off")
	}
	// The accepting loop's only timer is the back-off.
	if k.lastWait != 5*time.Millisecond {
		t.Fatalf("after a success the back-off is %v, want 5ms", k.lastWait)
	}
}

// TestAcceptErrorEndsServe: a permanent accept error ends the listener's
// Serve with that error.
func TestAcceptErrorEndsServe(t *testing.T) {
	w := newWorld()
	_, l, a := fakeServer(t, w, sockfsm.Config{})
	w.connect(&fsock{fd: 99})
	w.acceptErrs = []error{unix.EINVAL}
	settleLoop(t, l)
	select {
	case err := <-a.done:
		if err == nil || !errorsIs(err, unix.EINVAL) {
			t.Fatalf("Serve would return %v, want EINVAL", err)
		}
	default:
		t.Fatal("the acceptor is still open")
	}
	if len(l.accs) != 0 || l.s.nacceptors != 0 {
		t.Fatal("the acceptor is still counted")
	}
}

// TestMaxConnsPausesListener: at MaxConns the listener leaves the epoll set
// (no level-triggered readiness left armed), and returns when a
// connection closes.
func TestMaxConnsPausesListener(t *testing.T) {
	w := newWorld()
	var waits []time.Duration
	_, l, _ := fakeServer(t, w, sockfsm.Config{MaxConns: 1, IdleTimeout: 10 * time.Millisecond, LingerTimeout: 10 * time.Millisecond,
		OnMaxConnsWait: func(d time.Duration) { waits = append(waits, d) }})
	k, ak := l.k.(*fakeKernel), accepting(l)
	for range 2 {
		w.dial(64, 64)
	}
	settleLoop(t, l)
	if l.n != 1 || len(w.backlog) != 1 {
		t.Fatalf("%d connections open, %d in the backlog; want 1 and 1", l.n, len(w.backlog))
	}
	if ak.interest[listenFD] != 0 {
		t.Fatal("the listener is watched at MaxConns")
	}
	// The first connection idles out, half-closes, lingers out, closes.
	for i := 0; len(w.backlog) > 0 && i < 10; i++ {
		if l.n != 1 {
			t.Fatalf("%d connections open at MaxConns 1", l.n)
		}
		w.now = w.now.Add(max(k.lastWait, time.Millisecond))
		settleLoop(t, l)
	}
	if len(w.backlog) != 0 || l.n != 1 {
		t.Fatalf("after the first closed: %d open, %d in the backlog; want the second accepted", l.n, len(w.backlog))
	}
	if ak.interest[listenFD] != 0 {
		t.Fatal("the listener is watched at MaxConns again")
	}
	// The idle timeout (10ms) and the linger timeout (10ms) of the first.
	if len(waits) != 1 || waits[0] != 20*time.Millisecond {
		t.Errorf("OnMaxConnsWait heard %v, want one wait of 20ms", waits)
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// TestBudgetEndsAtClose: a connection whose step budget runs out on the
// step that closes it is still counted gone (NumConns, Shutdown's drain).
// Its input arrives with the FIN and is read a byte at a time, each echoed;
// an interrupted read takes a step of its own: some length makes the close
// the budget's last step.
func TestBudgetEndsAtClose(t *testing.T) {
	for i := range 4 * stepBudget {
		k, eintr := i/2+1, i%2 == 1
		w := newWorld()
		srv, l, _ := fakeServer(t, w, sockfsm.Config{ReadBufferSize: 1})
		s := w.dial(1<<10, 1<<10)
		settleLoop(t, l)
		s.eintr = eintr
		w.send(s, bytes.Repeat([]byte("x"), k))
		w.fin(s)
		settleLoop(t, l)
		if !s.closed || srv.NumConns() != 0 || l.n != 0 {
			t.Fatalf("%d bytes and a FIN: closed %v, NumConns %d, the loop's %d; want closed, 0, 0", k, s.closed, srv.NumConns(), l.n)
		}
		if !bytes.Equal(s.wire, bytes.Repeat([]byte("x"), k)) {
			t.Fatalf("%d bytes echoed as %q", k, s.wire)
		}
	}
}
