package sockfsm

// A rapid state-machine test (t.Repeat) of one connection. The test is both
// the engine's driver and its peer: each action is one thing the peer, the
// clock, the handler or the server does; after each, the engine is pumped
// until it would block, and the invariants are checked. At the end the peer
// goes quiet and time runs on: the connection must close within the bound
// computed from the config.

import (
	"bytes"
	"errors"
	"io"
	"os"
	"syscall"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm/fsm"
)

// smPeer is the model of the peer and the network.
type smPeer struct {
	inbuf      []byte // sent by the peer, not read by us
	fin, rst   bool   // the peer sent FIN; the peer reset
	stopped    bool   // the peer stopped reading
	window     []byte // our bytes in the peer's receive buffer
	windowSize int
	received   []byte // what the peer's application read
	lastInput  time.Time
}

type smHandler struct {
	calls, afterClose int
	closes            int
	wrote             []byte
	info              CloseInfo
}

func (h *smHandler) OnData(c *Conn, p []byte) {
	h.calls++
	if h.closes > 0 {
		h.afterClose++
	}
	n, _ := c.Write(p)
	h.wrote = append(h.wrote, p[:n]...)
}

func (h *smHandler) OnPeerClose(*Conn) {
	if h.closes > 0 {
		h.afterClose++
	}
}

func (h *smHandler) OnClose(_ *Conn, info CloseInfo) {
	if h.closes > 0 {
		h.afterClose++
	}
	h.closes++
	h.info = info
}

type smTest struct {
	cfg   Config
	e     *Engine
	h     *smHandler
	peer  smPeer
	now   time.Time
	start time.Time
	edges []edge

	finSent, closed  bool
	closes, badWrite int
	closedAt         time.Time
	lastWrite        time.Time // the handler's last accepted Write outside a callback
	paused           bool      // the handler paused reading
	resumedAt        time.Time // the handler last resumed reading
	sawClosed        bool
	blocked          Action
}

func newSMTest(t *rapid.T) *smTest {
	s := &smTest{cfg: drawConfig(t), h: &smHandler{}}
	s.start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.now = s.start
	s.peer.windowSize = rapid.IntRange(1, 256).Draw(t, "window")
	s.cfg.OnStateChange = func(_ ConnInfo, from, to fsm.State, ev fsm.Event) {
		s.edges = append(s.edges, edge{from, to, ev})
	}
	e, err := NewEngine(s.cfg, s.h, ConnInfo{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	s.e = e
	s.pump(t)
	return s
}

var errSMReset = os.NewSyscallError("read", syscall.ECONNRESET)

// pump performs the engine's operations until one would block.
func (s *smTest) pump(t *rapid.T) {
	for range 10000 {
		// The driver's part: the deadlines that passed and the requests
		// made since the last step are handled before the next operation.
		s.e.HandleTimeout(s.now)
		a := s.e.Next(s.now)
		s.blocked = a
		expired := !a.Deadline.IsZero() && !s.now.Before(a.Deadline)
		switch a.Op {
		case OpStart:
			s.e.Start(s.now)
		case OpWait:
			if !expired && !s.e.Pending() {
				return // blocked until a resume or the deadline
			}
		case OpRead:
			switch {
			case s.closed:
				t.Fatal("read after close")
			case s.peer.rst:
				s.e.ReadDone(s.now, nil, ResultReset, errSMReset)
			case len(s.peer.inbuf) > 0:
				n := min(len(s.peer.inbuf), s.cfg.limits().readBuf)
				p := append([]byte(nil), s.peer.inbuf[:n]...)
				s.peer.inbuf = s.peer.inbuf[n:]
				s.peer.lastInput = s.now
				s.e.ReadDone(s.now, p, ResultOK, nil)
			case s.peer.fin:
				s.peer.lastInput = s.now
				s.e.ReadDone(s.now, nil, ResultEOF, io.EOF)
			case expired:
				s.e.ReadDone(s.now, nil, ResultTimeout, os.ErrDeadlineExceeded)
			default:
				return // blocked
			}
		case OpWrite:
			if s.finSent || s.closed {
				s.badWrite++
			}
			free := s.peer.windowSize - len(s.peer.window)
			switch {
			case s.peer.rst:
				s.e.WriteDone(s.now, 0, ResultReset, errSMReset)
			case free > 0:
				n := min(free, len(a.Data))
				s.peer.window = append(s.peer.window, a.Data[:n]...)
				if n < len(a.Data) {
					s.e.WriteDone(s.now, n, ResultOK, nil) // the rest waits for room
					continue
				}
				s.e.WriteDone(s.now, n, ResultOK, nil)
			case expired:
				s.e.WriteDone(s.now, 0, ResultTimeout, os.ErrDeadlineExceeded)
			default:
				return // blocked on the peer's window
			}
		case OpCloseWrite:
			s.finSent = true
			s.e.CloseWriteDone(s.now, ResultOK, nil)
		case OpClose, OpAbort:
			s.closes++
			if !s.closed {
				s.closed, s.closedAt = true, s.now
			}
			s.e.CloseDone(s.now)
		case OpDone:
			return
		}
	}
	t.Fatal("livelock: the engine never blocked")
}

// check is the invariant, asserted after every action.
func (s *smTest) check(t *rapid.T) {
	if s.badWrite > 0 {
		t.Fatalf("%d writes after our half-close or close", s.badWrite)
	}
	st := s.e.State()
	if int(st) >= len(fsm.States()) {
		t.Fatalf("state %d is not a state of the table", st)
	}
	if s.sawClosed && st != fsm.Closed {
		t.Fatalf("left Closed for %s", st)
	}
	s.sawClosed = st == fsm.Closed
	prev := fsm.Accepted
	for _, e := range s.edges {
		if to, ok := fsm.Lookup(e.from, e.ev); !ok || to != e.to || e.from != prev {
			t.Fatalf("edge %s --%s--> %s not in the table (machine was in %s)", e.from, e.ev, e.to, prev)
		}
		prev = e.to
	}
	if s.h.closes > 1 || s.h.afterClose > 0 {
		t.Fatalf("OnClose %d times; %d callbacks after it", s.h.closes, s.h.afterClose)
	}
	if s.closes > 1 {
		t.Fatalf("transport closed %d times", s.closes)
	}
	if s.closes == 1 && s.h.closes != 1 {
		t.Fatal("transport closed but OnClose not called")
	}
	if s.h.info.Reason == ReasonInternal {
		t.Fatalf("engine bug: %v", s.h.info.Err)
	}
	got := append(append([]byte(nil), s.peer.received...), s.peer.window...)
	if !bytes.HasPrefix(s.h.wrote, got) && !s.e.CloseInfo().Aborted() {
		t.Fatalf("the peer got %q, not a prefix of %q", got, s.h.wrote)
	}
}

func TestStateMachine(t *testing.T) { rapid.Check(t, propStateMachine) }

func propStateMachine(t *rapid.T) {
	{
		s := newSMTest(t)
		step := func(f func()) func(*rapid.T) {
			return func(t *rapid.T) { f(); s.pump(t) }
		}
		t.Repeat(map[string]func(*rapid.T){
			"peer sends": func(t *rapid.T) {
				if s.peer.fin || s.peer.rst {
					t.Skip("the peer can no longer send")
				}
				s.peer.inbuf = append(s.peer.inbuf, rapid.SliceOfN(rapid.Byte(), 1, 40).Draw(t, "bytes")...)
				s.pump(t)
			},
			"peer half-closes": step(func() { s.peer.fin = true }),
			"peer resets": func(t *rapid.T) {
				if rapid.IntRange(0, 9).Draw(t, "really") != 5 {
					t.Skip("resets are rare")
				}
				s.peer.rst = true
				s.peer.window = nil
				s.pump(t)
			},
			"peer stops reading":   step(func() { s.peer.stopped = true }),
			"peer resumes reading": step(func() { s.peer.stopped = false }),
			"peer reads": func(t *rapid.T) {
				if s.peer.stopped || len(s.peer.window) == 0 {
					t.Skip("nothing to read")
				}
				n := rapid.IntRange(1, len(s.peer.window)).Draw(t, "n")
				s.peer.received = append(s.peer.received, s.peer.window[:n]...)
				s.peer.window = s.peer.window[n:]
				s.pump(t)
			},
			"time advances": func(t *rapid.T) {
				// A blocked operation returns at its deadline, so time
				// stops at each deadline on the way.
				target := s.now.Add(time.Duration(rapid.IntRange(0, 30_000).Draw(t, "ms")) * time.Millisecond)
				for range 1000 {
					dl := s.blocked.Deadline
					if s.blocked.Op == OpDone || dl.IsZero() || dl.After(target) {
						break
					}
					s.now = maxTime(s.now, dl)
					s.pump(t)
				}
				s.now = maxTime(s.now, target)
				s.pump(t)
			},
			"handler writes": step(func() {
				p := []byte("out")
				n, err := s.e.Conn().Write(p)
				s.h.wrote = append(s.h.wrote, p[:n]...)
				if n > 0 {
					s.lastWrite = s.now
				}
				if err != nil && !errors.Is(err, ErrShutdown) && !errors.Is(err, ErrOutputFull) {
					panic(err)
				}
			}),
			"handler half-closes": step(func() { s.e.Conn().CloseWrite() }),
			"handler closes":      step(func() { s.e.Conn().Close() }),
			"handler aborts": func(t *rapid.T) {
				if rapid.IntRange(0, 9).Draw(t, "really") != 5 {
					t.Skip("aborts are rare")
				}
				s.e.Conn().Abort(nil)
				s.pump(t)
			},
			"handler pauses reading": step(func() { s.e.Conn().PauseRead(); s.paused = true }),
			"handler resumes reading": step(func() {
				s.e.Conn().ResumeRead()
				if s.paused {
					s.paused, s.resumedAt = false, s.now
				}
			}),
			"handler runs a task": step(func() {
				s.e.Conn().Do(func(c *Conn) {
					p := []byte("task")
					n, _ := c.Write(p)
					s.h.wrote = append(s.h.wrote, p[:n]...)
					if n > 0 {
						s.lastWrite = s.now
					}
				})
			}),
			"server shuts down": step(func() { s.e.Close() }),
			"server aborts": func(t *rapid.T) {
				if rapid.IntRange(0, 9).Draw(t, "really") != 5 {
					t.Skip("aborts are rare")
				}
				s.e.Abort(ErrShutdownDeadline)
				s.pump(t)
			},
			"": s.check,
		})

		// Liveness: the peer goes quiet (it may still have stopped
		// reading, never sent FIN, anything); time runs to each deadline
		// the engine sets. The connection closes, exactly once, within
		// the bound. A handler that paused reading resumes: one that never
		// does holds its connection, as PauseRead says.
		if s.paused {
			s.e.Conn().ResumeRead()
			s.paused, s.resumedAt = false, s.now
			s.pump(t)
		}
		for range 1000 {
			if s.e.State() == fsm.Closed && s.closes > 0 {
				break
			}
			if s.blocked.Deadline.IsZero() {
				if _, ok := s.cfg.CloseBound(); ok || s.cfg.MaxLifetime > 0 {
					t.Fatalf("blocked in %s on %s with no deadline", s.e.State(), s.blocked.Op)
				}
				return
			}
			s.now = s.blocked.Deadline
			s.pump(t)
			s.check(t)
		}
		if !s.closed || s.closes != 1 || s.h.closes != 1 {
			t.Fatalf("not closed exactly once: closed=%v closes=%d OnClose=%d", s.closed, s.closes, s.h.closes)
		}
		last := s.start
		if s.peer.lastInput.After(last) {
			last = s.peer.lastInput
		}
		if s.lastWrite.After(last) {
			last = s.lastWrite // a write between callbacks starts a new flush and idle period
		}
		if s.resumedAt.After(last) {
			last = s.resumedAt // the idle timer restarts when reading resumes
		}
		if b, ok := s.cfg.CloseBound(); ok && s.closedAt.Sub(last) > b {
			t.Fatalf("closed %v after the last activity; the bound is %v", s.closedAt.Sub(last), b)
		}
		if b, ok := s.cfg.LifetimeBound(); ok && s.closedAt.Sub(s.start) > b {
			t.Fatalf("closed %v after the start; the MaxLifetime bound is %v", s.closedAt.Sub(s.start), b)
		}
	}
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// FuzzEngine runs the simulation properties under go test -fuzz:
//
//	go test -run '^$' -fuzz FuzzEngine .
func FuzzEngine(f *testing.F) {
	f.Fuzz(rapid.MakeFuzz(func(t *rapid.T) {
		w := run(t, drawConfig(t), drawPeer(t, rapid.Bool().Draw(t, "faults")), true, true)
		checkCommon(t, w)
	}))
}
