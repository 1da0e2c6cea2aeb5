//go:build linux

package loop

// The loop's logic without a kernel: loops run on fake kernels
// (fake_linux_test.go) in a simulated world on a virtual clock, and rapid
// draws what the peers do (connect, send, half-close, reset, read or not,
// trickle), what other goroutines ask of the connections (Write, Close,
// Abort, PauseRead, ResumeRead), interrupted system calls, the server's
// Shutdown and its deadline, and how time passes. A failing schedule
// shrinks and replays (rapid's -rapid.failfile).
//
// For every connection it checks the three promises: nothing is written
// after our FIN; every connection is closed exactly once (one close or
// abort of its descriptor, one OnClose), within Config.CloseBound of its
// last activity and Config.LifetimeBound of its accept; and the bytes on
// the wire are exactly those the handler wrote, in order, or a prefix of
// them if the connection was aborted. And of the loop itself: it never
// touches a closed descriptor, and after every action it settles (its
// epoll_wait would block) within a bounded number of turns: no spinning.

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm"
)

func TestLoopProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) { newHarness(rt).run() })
}

// maxSettleTurns bounds the turns of every loop after one action: the
// work an action can cause is bounded (small buffers, one step budget per
// turn), so more turns mean the loop spins.
const maxSettleTurns = 2000

// tconn is the test's record of one connection.
type tconn struct {
	s      *fsock
	refuse bool // NewHandler returns nil for it
	conn   *sockfsm.Conn
	paused bool

	accepted bool
	opened   time.Time // accepted
	last     time.Time // the last activity: accept, input, a Write, ResumeRead
	expect   []byte    // what the handler's Writes took, in order
	info     *sockfsm.CloseInfo
	closedAt time.Time
	notified int // OnClose calls

	pausedAtClose bool // reading was paused when it closed: IdleTimeout was not running
}

type harness struct {
	t     *rapid.T
	w     *world
	cfg   sockfsm.Config
	srv   *Server
	st    *serverState
	acc   *acceptor
	mu    sync.Mutex // the handler runs on the test's goroutine, Writes on others
	conns []*tconn
	byFD  map[int32]*tconn
	shut  bool // the server was told to shut down
}

func newHarness(t *rapid.T) *harness {
	ms := func(lo, hi int, name string) time.Duration {
		return time.Duration(rapid.IntRange(lo, hi).Draw(t, name)) * time.Millisecond
	}
	cfg := sockfsm.Config{
		IdleTimeout:      ms(5, 100, "idle"),
		WriteTimeout:     ms(5, 100, "write"),
		LingerTimeout:    ms(5, 50, "lingerTimeout"),
		LingerTime:       ms(5, 200, "lingerTime"),
		LingerBytes:      int64(rapid.IntRange(1, 128).Draw(t, "lingerBytes")),
		MaxPendingOutput: rapid.IntRange(1, 256).Draw(t, "maxOut"),
		ReadBufferSize:   rapid.IntRange(1, 64).Draw(t, "readBuf"),
		MaxConns:         rapid.IntRange(0, 4).Draw(t, "maxConns"),
	}
	if rapid.Bool().Draw(t, "lifetime") {
		cfg.MaxLifetime = ms(10, 300, "maxLifetime")
	}
	h := &harness{t: t, w: newWorld(), byFD: map[int32]*tconn{}}
	h.w.noInherit = rapid.Bool().Draw(t, "noInheritNoDelay")
	h.w.mptcp = rapid.Bool().Draw(t, "mptcpListener")
	cfg.Logger = discardLogger
	h.cfg = cfg
	h.srv = &Server{Config: cfg, NewHandler: h.newHandler, Loops: rapid.IntRange(1, 3).Draw(t, "loops")}
	h.st = &h.srv.impl
	h.st.newKernel = h.w.newKernel
	h.st.mu.Lock()
	h.st.initLocked(h.srv)
	if err := h.st.makeLoops(h.srv.Loops); err != nil {
		t.Fatal(err)
	}
	h.st.nacceptors++
	h.st.mu.Unlock()
	h.acc = &acceptor{fd: listenFD, tcp: true, laddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, done: make(chan error, 1)}
	// Serve gives the listener to loops[0], which serves nothing: drawn
	// half the time. Given to a serving loop, that loop accepts and
	// serves (itself among the loops it hands connections to).
	accepting := 0
	if !rapid.Bool().Draw(t, "acceptorOnTheAcceptingLoop") {
		accepting = rapid.IntRange(1, len(h.st.loops)-1).Draw(t, "acceptingLoop")
	}
	h.st.loops[accepting].postAcceptor(h.acc)
	return h
}

func (h *harness) kernel(l *eventLoop) *fakeKernel { return l.k.(*fakeKernel) }

// ---- the handler ---------------------------------------------------------------

func (h *harness) newHandler(info sockfsm.ConnInfo) sockfsm.Handler {
	fd := int32(info.RemoteAddr.(*net.TCPAddr).Port)
	tc := h.byFD[fd]
	if tc == nil {
		h.t.Fatalf("NewHandler for fd %d, which never connected", fd)
	}
	if tc.accepted {
		h.t.Fatalf("fd %d accepted twice", fd)
	}
	tc.accepted, tc.opened, tc.last = true, h.w.now, h.w.now
	if tc.refuse {
		return nil
	}
	return &fakeHandler{h, tc}
}

// fakeHandler echoes; input holding 0xFF closes, 0xFE half-closes.
type fakeHandler struct {
	h  *harness
	tc *tconn
}

func (f *fakeHandler) OnOpen(c *sockfsm.Conn) {
	f.h.mu.Lock()
	f.tc.conn = c
	f.h.mu.Unlock()
}

func (f *fakeHandler) OnData(c *sockfsm.Conn, p []byte) {
	f.h.mu.Lock()
	defer f.h.mu.Unlock()
	f.tc.last = f.h.w.now
	n, _ := c.Write(p)
	f.tc.expect = append(f.tc.expect, p[:n]...)
	if bytes.IndexByte(p, 0xFF) >= 0 {
		c.Close()
	}
	if bytes.IndexByte(p, 0xFE) >= 0 {
		c.CloseWrite()
	}
}

func (f *fakeHandler) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	f.h.mu.Lock()
	defer f.h.mu.Unlock()
	f.tc.info = &info
	f.tc.closedAt = f.h.w.now
	f.tc.pausedAtClose = f.tc.paused
	f.tc.notified++
}

// ---- driving the loops ------------------------------------------------------------

// settle turns the loops until each one's epoll_wait would block: nothing
// ready, no wake-up, no work queued, no timer due.
func (h *harness) settle() {
	for range maxSettleTurns {
		idle := true
		for _, l := range h.st.loops {
			l.turn()
			if !h.kernel(l).idle {
				idle = false
			}
		}
		if len(h.w.problems) > 0 {
			h.t.Fatalf("the loop did what no kernel allows: %q", h.w.problems)
		}
		if idle {
			h.checkIdle()
			return
		}
	}
	h.t.Fatalf("the loops did not settle in %d turns: a loop spins", maxSettleTurns)
}

// checkIdle checks, when every loop would block, that none would sleep
// through work: for every connection of a loop, the engine's next
// operation cannot progress on its socket (nothing to read, no room to
// write), and the loop's epoll_wait timeout ends by the engine's deadline.
func (h *harness) checkIdle() {
	for _, l := range h.st.loops {
		k := h.kernel(l)
		// A connection waits to be accepted: the loop sleeps only if it
		// is at MaxConns or backing off.
		if len(h.w.backlog) > 0 && slices.Contains(l.accs, h.acc) && !h.acc.paused && h.acc.resumeAt == 0 {
			h.t.Fatalf("the listener's queue holds %d connections, the server accepts, and the loop sleeps", len(h.w.backlog))
		}
		for _, c := range l.conns {
			if c == nil {
				continue
			}
			s := h.w.socks[c.fd]
			a := c.e.Next(h.w.now) // a poll; the loop is parked after its own Next
			switch a.Op {
			case sockfsm.OpRead:
				if len(s.inq) > 0 || s.peerFIN || s.rst {
					h.t.Fatalf("fd %d: the engine reads, the socket has input (%d bytes, FIN %v, RST %v), and the loop sleeps", c.fd, len(s.inq), s.peerFIN, s.rst)
				}
			case sockfsm.OpWrite:
				if s.room() > 0 || s.rst {
					h.t.Fatalf("fd %d: the engine writes, the socket has room (%d bytes, RST %v), and the loop sleeps", c.fd, s.room(), s.rst)
				}
			case sockfsm.OpWait:
			default:
				h.t.Fatalf("fd %d: the loop sleeps while the engine asks for %s", c.fd, a.Op)
			}
			// A request during a write needs no wake-up unless it is an
			// abort (Engine.SetWaker); the write's end takes it.
			if c.e.Pending() && a.Op != sockfsm.OpWrite {
				h.t.Fatalf("fd %d: the loop sleeps in %s with a request pending", c.fd, a.Op)
			}
			dl := c.e.Timeout()
			if dl.IsZero() {
				continue
			}
			if k.lastWait < 0 || h.w.now.Add(k.lastWait).After(dl) {
				h.t.Fatalf("fd %d: the engine's deadline is in %v, the loop sleeps for %v", c.fd, dl.Sub(h.w.now), k.lastWait)
			}
		}
	}
}

// nextTimer is how long until the first loop's timer, 0 if none.
func (h *harness) nextTimer() time.Duration {
	var d time.Duration
	for _, l := range h.st.loops {
		if m := h.kernel(l).lastWait; m > 0 && (d == 0 || m < d) {
			d = m
		}
	}
	return d
}

// advance lets d pass, waking the loops at each of their timers on the
// way, as their epoll_wait timeouts would. The loops first take what the
// actions before it in a burst left them: a woken loop runs before time
// passes, and its timers are known only once it has waited.
func (h *harness) advance(d time.Duration) {
	h.settle()
	for d > 0 {
		step := d
		if n := h.nextTimer(); n > 0 && n < step {
			step = n
		}
		h.w.now = h.w.now.Add(step)
		d -= step
		h.settle()
	}
}

// fromGoroutine runs f on another goroutine, as a pusher would, and waits
// for it.
func fromGoroutine(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// open returns the connections the handler can reach.
func (h *harness) open() []*tconn {
	var cs []*tconn
	for _, tc := range h.conns {
		if tc.conn != nil && tc.notified == 0 {
			cs = append(cs, tc)
		}
	}
	return cs
}

func (h *harness) live() []*tconn {
	var cs []*tconn
	for _, tc := range h.conns {
		if !tc.s.closed && !tc.s.rst {
			cs = append(cs, tc)
		}
	}
	return cs
}

// ---- the run --------------------------------------------------------------------

func (h *harness) run() {
	t := h.t
	h.settle()
	steps := rapid.IntRange(1, 60).Draw(t, "steps")
	for range steps {
		// A burst of actions between turns: edges and wake-ups reported
		// by the same wait (a step of time lets the loops turn first:
		// see advance).
		for range rapid.IntRange(1, 3).Draw(t, "burst") {
			h.act()
		}
		h.settle()
	}
	h.finish()
	h.check()
}

// act performs one drawn action of the world.
func (h *harness) act() {
	t := h.t
	pick := func(cs []*tconn, name string) *tconn {
		if len(cs) == 0 {
			return nil
		}
		return cs[rapid.IntRange(0, len(cs)-1).Draw(t, name)]
	}
	switch rapid.IntRange(0, 13).Draw(t, "action") {
	case 0, 1: // a peer connects
		s := h.w.dial(rapid.IntRange(1, 256).Draw(t, "rcvCap"), rapid.IntRange(1, 256).Draw(t, "sndCap"))
		tc := &tconn{s: s, refuse: rapid.IntRange(0, 15).Draw(t, "refuse") == 0}
		h.conns = append(h.conns, tc)
		h.byFD[s.fd] = tc
	case 2, 3: // a peer sends
		if tc := pick(h.live(), "conn"); tc != nil {
			h.w.send(tc.s, rapid.SliceOfN(rapid.Byte(), 1, 64).Draw(t, "data"))
		}
	case 4: // a peer half-closes
		if tc := pick(h.live(), "conn"); tc != nil {
			h.w.fin(tc.s)
		}
	case 5: // a peer resets
		if tc := pick(h.live(), "conn"); tc != nil {
			h.w.reset(tc.s)
		}
	case 6, 7: // a peer reads
		if tc := pick(h.live(), "conn"); tc != nil {
			h.w.read(tc.s, rapid.IntRange(1, 256).Draw(t, "n"))
		}
	case 8: // time passes
		h.advance(time.Duration(rapid.IntRange(1, 150).Draw(t, "ms")) * time.Millisecond)
	case 9: // another goroutine writes
		if tc := pick(h.open(), "conn"); tc != nil {
			data := rapid.SliceOfN(rapid.Byte(), 1, 64).Draw(t, "push")
			fromGoroutine(func() {
				h.mu.Lock()
				defer h.mu.Unlock()
				if n, _ := tc.conn.Write(data); n > 0 {
					tc.expect = append(tc.expect, data[:n]...)
					tc.last = h.w.now
				}
			})
		}
	case 10: // another goroutine closes, half-closes, aborts
		if tc := pick(h.open(), "conn"); tc != nil {
			how := rapid.IntRange(0, 2).Draw(t, "how")
			fromGoroutine(func() {
				switch how {
				case 0:
					tc.conn.Close()
				case 1:
					tc.conn.CloseWrite()
				case 2:
					tc.conn.Abort(nil)
				}
			})
		}
	case 11: // another goroutine pauses or resumes reading
		if tc := pick(h.open(), "conn"); tc != nil {
			h.pause(tc, !tc.paused)
		}
	case 12: // the next read or write of a connection is interrupted
		if tc := pick(h.live(), "conn"); tc != nil {
			tc.s.eintr = true
		}
	case 13: // the server shuts down; later its deadline passes
		h.st.mu.Lock()
		if !h.shut {
			h.shut = true
			h.st.stopLocked(h.srv, true)
			h.st.checkDrainedLocked()
			h.st.mu.Unlock()
		} else {
			h.st.mu.Unlock()
			h.st.kill()
		}
	}
}

func (h *harness) pause(tc *tconn, pause bool) {
	fromGoroutine(func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		tc.paused = pause
		if pause {
			tc.conn.PauseRead()
		} else {
			tc.conn.ResumeRead()
			tc.last = h.w.now
		}
	})
}

// finish lets time pass, with the peers idle, until every accepted
// connection is closed: the bounds guarantee it.
func (h *harness) finish() {
	for _, tc := range h.open() {
		if tc.paused {
			h.pause(tc, false) // a handler that never resumes holds its connection
		}
	}
	h.settle()
	for range 10_000 {
		if h.drained() {
			break
		}
		d := h.nextTimer()
		if d == 0 {
			h.t.Fatalf("connections are open and no loop has a timer: %s", h.describe())
		}
		h.advance(d)
	}
	if !h.drained() {
		h.t.Fatalf("connections still open after 10000 timers: %s", h.describe())
	}
	// Shut down (again): the acceptor closes and the server is drained.
	h.st.mu.Lock()
	h.st.stopLocked(h.srv, true)
	h.st.checkDrainedLocked()
	h.st.mu.Unlock()
	h.settle()
	select {
	case <-h.st.drained:
	default:
		h.t.Fatalf("the server is not drained: %d connections, %d acceptors", h.st.nconns.Load(), h.st.nacceptors)
	}
	select {
	case err := <-h.acc.done:
		if err != sockfsm.ErrServerClosed {
			h.t.Fatalf("the acceptor ended with %v", err)
		}
	default:
		h.t.Fatal("the acceptor is still open")
	}
	for _, l := range h.st.loops {
		l.postCmd(cmdExit)
		l.turn()
		if !l.exit {
			h.t.Fatal("a loop did not take cmdExit")
		}
		l.close()
		if !h.kernel(l).down || len(l.timers) != 0 || len(l.runq) != 0 || l.n != 0 || slices.ContainsFunc(l.conns, func(c *conn) bool { return c != nil }) {
			h.t.Fatalf("a loop exited with state left: %d timers, %d queued, %d conns", len(l.timers), len(l.runq), l.n)
		}
	}
}

// drained reports whether every accepted connection is closed and no
// connection waits to be accepted by a listener still open.
func (h *harness) drained() bool {
	if len(h.w.backlog) > 0 && !h.shut {
		return false
	}
	for _, tc := range h.conns {
		if tc.accepted && !tc.s.closed {
			return false
		}
	}
	return h.st.nconns.Load() == 0
}

func (h *harness) describe() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "backlog %d, shut %v, nconns %d, slots %d, paused %d", len(h.w.backlog), h.shut, h.st.nconns.Load(), h.st.slots.Load(), h.st.paused.Load())
	for _, l := range h.st.loops {
		for _, a := range l.accs {
			fmt.Fprintf(&b, "\n acceptor: paused %v, watched %v, resumeAt %d", a.paused, a.watched, a.resumeAt)
		}
	}
	for _, tc := range h.conns {
		st := "-"
		if tc.conn != nil {
			st = tc.conn.State().String()
		}
		fmt.Fprintf(&b, "\n fd %d accepted %v state %s closed %v paused %v", tc.s.fd, tc.accepted, st, tc.s.closed, tc.paused)
	}
	return b.String()
}

// check checks the promises for every connection.
func (h *harness) check() {
	t := h.t
	closeBound, _ := h.cfg.CloseBound()
	lifeBound, lifeOn := h.cfg.LifetimeBound()
	// The loop wakes exactly at its timers.
	const slack = 0
	for _, tc := range h.conns {
		s := tc.s
		if s.writesAfterFIN > 0 {
			t.Errorf("fd %d: %d writes after our FIN", s.fd, s.writesAfterFIN)
		}
		if !tc.accepted {
			if s.closes != 0 {
				t.Errorf("fd %d: never accepted, closed %d times", s.fd, s.closes)
			}
			continue
		}
		if s.closes != 1 {
			t.Errorf("fd %d: closed %d times, want once", s.fd, s.closes)
		}
		if tc.refuse {
			if !s.aborted || tc.notified != 0 {
				t.Errorf("fd %d: NewHandler refused it: aborted %v, OnClose %d times; want aborted, no OnClose", s.fd, s.aborted, tc.notified)
			}
			continue
		}
		if tc.notified != 1 {
			t.Errorf("fd %d: OnClose called %d times, want once", s.fd, tc.notified)
			continue
		}
		info := tc.info
		if info.Aborted() != s.aborted {
			t.Errorf("fd %d: CloseInfo says aborted %v (%s), the socket was aborted %v", s.fd, info.Aborted(), info.Reason, s.aborted)
		}
		if info.Aborted() {
			if !bytes.HasPrefix(tc.expect, s.wire) {
				t.Errorf("fd %d (aborted, %s): the wire holds %d bytes that are not a prefix of the %d the handler wrote", s.fd, info.Reason, len(s.wire), len(tc.expect))
			}
		} else if !bytes.Equal(s.wire, tc.expect) {
			t.Errorf("fd %d (closed, %s): the wire holds %d bytes, the handler wrote %d: lost or reordered", s.fd, info.Reason, len(s.wire), len(tc.expect))
		}
		// A close with input unread makes Linux send RST, and the peer
		// loses what it had not read: a graceful close reads to the
		// peer's FIN first, unless its linger reached a bound.
		if !info.Aborted() && (info.Linger == sockfsm.LingerEndNone || info.Linger == sockfsm.LingerEndPeerFIN) && s.unreadAtClose > 0 {
			t.Errorf("fd %d (closed, %s, linger %s): closed with %d bytes unread: the kernel resets it", s.fd, info.Reason, info.Linger, s.unreadAtClose)
		}
		if info.BytesWritten != int64(len(s.wire)) || info.BytesRead != s.readIn {
			t.Errorf("fd %d: CloseInfo counts %d read, %d written; the socket %d, %d", s.fd, info.BytesRead, info.BytesWritten, s.readIn, len(s.wire))
		}
		// While reading is paused IdleTimeout does not run: only
		// MaxLifetime bounds the connection (Conn.PauseRead).
		if limit := tc.last.Add(closeBound + slack); !tc.pausedAtClose && tc.closedAt.After(limit) {
			t.Errorf("fd %d: closed (%s) %v after its last activity, beyond CloseBound %v", s.fd, info.Reason, tc.closedAt.Sub(tc.last), closeBound)
		}
		if lifeOn && tc.closedAt.After(tc.opened.Add(lifeBound+slack)) {
			t.Errorf("fd %d: closed (%s) %v after its accept, beyond LifetimeBound %v", s.fd, info.Reason, tc.closedAt.Sub(tc.opened), lifeBound)
		}
	}
}

// discardLogger drops the logs of the loops under test.
var discardLogger = slog.New(slog.DiscardHandler)
