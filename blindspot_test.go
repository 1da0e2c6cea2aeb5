package sockfsm

// Engine-level tests of the audit's blind spots, driven by hand on a virtual
// clock with engine_test.go's helpers (receiving, halfClosed, expect): the
// linger deadline moving earlier, LingerBytes after the handler's own
// CloseWrite, short writes resuming at the right offset, the exact
// MaxPendingOutput boundary, the idle timer after unanswered input and for a
// push-only connection, and which requests call the waker.
//
// "From another goroutine" means from a goroutine of the test's own that the
// test waits for (bsOutside): the engine's step is not running, as when a
// driver is blocked in the operation Next returned.

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// bsOutside runs f on another goroutine and waits (bounded) for it.
func bsOutside(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a request from another goroutine blocked")
	}
}

// bsWrite writes p from another goroutine and checks what Write returned.
func bsWrite(t *testing.T, c *Conn, p string, wantN int, wantErr error) {
	t.Helper()
	var n int
	var err error
	bsOutside(t, func() { n, err = c.Write([]byte(p)) })
	if n != wantN || !errors.Is(err, wantErr) || (wantErr == nil && err != nil) {
		t.Fatalf("Write(%q) from another goroutine = %d, %v; want %d, %v", p, n, err, wantN, wantErr)
	}
}

// bsRoom checks Buffered and Available.
func bsRoom(t *testing.T, c *Conn, buffered, available int) {
	t.Helper()
	if b, a := c.Buffered(), c.Available(); b != buffered || a != available {
		t.Fatalf("Buffered %d, Available %d; want %d, %d", b, a, buffered, available)
	}
}

// --- a: the linger read deadline when it moves earlier ---

// TestBlindLingerDeadlineMovesEarlier: when the handler closes, the read
// deadline Next returns moves from the idle deadline to the nearer linger
// bound, and after a linger read to whichever bound is nearer: LingerTimeout
// from that read, or what remains of LingerTime. The engine closes at that
// deadline, not at a later one.
func TestBlindLingerDeadlineMovesEarlier(t *testing.T) {
	s := time.Second
	for _, tc := range []struct {
		name                     string
		lingerTimeout, lingerTim time.Duration
		// Half-closed at t0+5s; a linger read at t0+7s.
		beforeRead, afterRead time.Time
		end                   LingerEnd
	}{
		// LingerTimeout after the read (t0+10s) is nearer than LingerTime
		// (t0+12s).
		{"TimeoutNearer", 3 * s, 7 * s, t0.Add(8 * s), t0.Add(10 * s), LingerEndTimeout},
		// LingerTime's remaining (t0+9s) is nearer than LingerTimeout after
		// the read (t0+10s).
		{"TimeNearer", 3 * s, 4 * s, t0.Add(8 * s), t0.Add(9 * s), LingerEndTime},
		// LingerTime is shorter than LingerTimeout from the start.
		{"TimeShorter", 5 * s, 3 * s, t0.Add(8 * s), t0.Add(8 * s), LingerEndTime},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testCfg // IdleTimeout 10s
			cfg.LingerTimeout, cfg.LingerTime, cfg.LingerBytes = tc.lingerTimeout, tc.lingerTim, -1
			e, h := receiving(t, cfg)
			closeNext := false
			h.onData = func(c *Conn, p []byte) {
				if closeNext {
					c.Close()
				}
			}
			// Input at t0+4s moves the idle deadline to t0+14s.
			at := t0.Add(4 * s)
			e.ReadDone(at, []byte("a"), ResultOK, nil)
			expect(t, e, at, OpRead, "", at.Add(cfg.IdleTimeout))
			// At t0+5s the handler closes: the deadline moves earlier.
			closeNext = true
			at = t0.Add(5 * s)
			e.ReadDone(at, []byte("b"), ResultOK, nil)
			expect(t, e, at, OpCloseWrite, "", time.Time{})
			e.CloseWriteDone(at, ResultOK, nil)
			a := expect(t, e, at, OpRead, "", tc.beforeRead)
			if !a.Deadline.Before(t0.Add(14 * s)) {
				t.Fatalf("the linger deadline %v is not earlier than the idle one", a.Deadline)
			}
			// A linger read at t0+7s (discarded: the handler asked for a
			// full close).
			at = t0.Add(7 * s)
			e.ReadDone(at, []byte("cc"), ResultOK, nil)
			expect(t, e, at, OpRead, "", tc.afterRead)
			// Nothing happens before the deadline; the close comes at it.
			expect(t, e, tc.afterRead.Add(-time.Nanosecond), OpRead, "", tc.afterRead)
			expect(t, e, tc.afterRead, OpClose, "", time.Time{})
			e.CloseDone(tc.afterRead)
			info := h.infos[0]
			if info.Linger != tc.end || info.Reason != ReasonHandlerClose || info.Discarded != 2 || info.BytesRead != 4 {
				t.Fatalf("info %+v; want linger %s, reason handler-close, 4 read, 2 discarded", info, tc.end)
			}
		})
	}
}

// TestBlindDriverRearmsEarlierReadDeadline: the driver re-arms the read
// deadline when the engine's moves earlier, even by less than the slack it
// allows a deadline that moves later: the handler closes, and the linger
// bound (LingerTimeout, or LingerTime) is 10ms nearer than the idle deadline
// armed for the read before.
func TestBlindDriverRearmsEarlierReadDeadline(t *testing.T) {
	for _, tc := range []struct {
		name                      string
		lingerTimeout, lingerTime time.Duration
	}{
		{"LingerTimeout", 3 * time.Second, 7 * time.Second},
		{"LingerTime", 5 * time.Second, 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := t0
			cfg := Config{IdleTimeout: 3*time.Second + 10*time.Millisecond, LingerTimeout: tc.lingerTimeout, LingerTime: tc.lingerTime}
			tr := &scripted{t: t, reads: []scriptedRead{{"bye", nil}}} // then EOF
			var armed time.Time
			var atRead []time.Time
			tr.onSetRDL = func(dl time.Time) { armed = dl }
			tr.onRead = func() { atRead = append(atRead, armed) }
			h := &testHandler{onData: func(c *Conn, _ []byte) { c.Close() }}
			d := &driver{}
			d.init(tr, cfg.limits(), h, ConnInfo{ID: 1}, &cfg, func() time.Time { return clock })
			d.run()
			want := []time.Time{t0.Add(cfg.IdleTimeout), t0.Add(3 * time.Second)}
			if len(atRead) != 2 || !atRead[0].Equal(want[0]) || !atRead[1].Equal(want[1]) {
				t.Fatalf("read deadlines armed at each Read: %v; want %v", atRead, want)
			}
			if d.result.Reason != ReasonHandlerClose || d.result.Linger != LingerEndPeerFIN || !tr.fin || tr.closes != 1 {
				t.Fatalf("result %+v, fin %v, closes %d", d.result, tr.fin, tr.closes)
			}
		})
	}
}

// --- b: LingerBytes after the handler's own CloseWrite ---

// TestBlindLingerBytesAfterCloseWrite: after the handler's CloseWrite, input
// still goes to the handler, counts towards LingerBytes (and BytesRead), is
// not counted as discarded, and LingerBytes closes the connection: not one
// byte before the bound, at once when it is reached.
func TestBlindLingerBytesAfterCloseWrite(t *testing.T) {
	e, h := receiving(t, testCfg) // LingerBytes 100
	h.onData = func(c *Conn, p []byte) {
		if string(p) == "request" {
			c.Write([]byte("answer"))
			if err := c.CloseWrite(); err != nil {
				t.Errorf("CloseWrite: %v", err)
			}
		}
	}
	e.ReadDone(t0, []byte("request"), ResultOK, nil)
	expect(t, e, t0, OpWrite, "answer", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0, 6, ResultOK, nil)
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
	e.CloseWriteDone(t0, ResultOK, nil)
	expectState(t, e, fsm.HalfClosed)

	sent := []byte("request")
	for i, n := range []int{60, 39} {
		at := t0.Add(time.Duration(i+1) * time.Second)
		p := bytes.Repeat([]byte{byte('a' + i)}, n)
		sent = append(sent, p...)
		e.ReadDone(at, p, ResultOK, nil)
		expect(t, e, at, OpRead, "", at.Add(testCfg.LingerTimeout))
	}
	if info := e.CloseInfo(); info.BytesRead != 106 || info.Discarded != 0 {
		t.Fatalf("after 99 linger bytes: %+v; want 106 read, none discarded", info)
	}
	at := t0.Add(3 * time.Second)
	sent = append(sent, 'z')
	e.ReadDone(at, []byte("z"), ResultOK, nil) // the 100th
	expect(t, e, at, OpClose, "", time.Time{})
	e.CloseDone(at)
	if !bytes.Equal(h.received, sent) {
		t.Fatalf("the handler received %q, want %q", h.received, sent)
	}
	info := h.infos[0]
	if info.Linger != LingerEndBytes || info.Reason != ReasonHandlerClose || info.BytesRead != int64(len(sent)) ||
		info.Discarded != 0 || info.BytesWritten != 6 || info.Aborted() {
		t.Fatalf("info %+v; want linger bytes, handler-close, %d read, 0 discarded, 6 written", info, len(sent))
	}
}

// --- c: consecutive short writes ---

// TestBlindShortWritesResumeAtOffset: a flush made of many short writes
// (WriteDone with n < len, some reporting a wake-up, ResultTimeout), with
// Conn.Write appending from another goroutine while a write is in flight
// and between steps. Each Next hands out exactly the unwritten rest of the
// queue, in order, no byte repeated or skipped; the Data of a write in
// flight does not change under it; Buffered follows; once the rest is
// written the engine reads again and BytesWritten counts every byte.
func TestBlindShortWritesResumeAtOffset(t *testing.T) {
	e, h := receiving(t, testCfg)
	c := e.Conn()
	var want []byte // everything queued, in order
	seq := uint32(0)
	gen := func(n int) []byte { // bytes that do not repeat with any short period
		p := make([]byte, n)
		for i := range p {
			seq++
			p[i] = byte(seq ^ seq>>8 ^ seq>>16)
		}
		return p
	}
	h.onData = func(c *Conn, _ []byte) {
		p := gen(10000)
		if n, err := c.Write(p); n != len(p) || err != nil {
			t.Errorf("Write = %d, %v", n, err)
		}
		want = append(want, p...)
	}
	appendOutside := func(n int) {
		t.Helper()
		p := gen(n)
		bsWrite(t, c, string(p), n, nil)
		want = append(want, p...)
	}
	e.ReadDone(t0, []byte("go"), ResultOK, nil)

	rng := rand.New(rand.NewPCG(1, 2))
	sent, shorts, timeouts := 0, 0, 0
	now := t0
	for i := range 400 {
		now = t0.Add(time.Duration(i) * time.Millisecond) // well within WriteTimeout
		a := e.Next(now)
		if a.Op != OpWrite || !bytes.Equal(a.Data, want[sent:]) {
			t.Fatalf("step %d: Next = %s with %d bytes; want a write of the %d unwritten bytes from offset %d (equal: %v)",
				i, a.Op, len(a.Data), len(want)-sent, sent, bytes.Equal(a.Data, want[sent:]))
		}
		inFlight := bytes.Clone(a.Data)
		if rng.IntN(2) == 0 {
			appendOutside(1 + rng.IntN(3000))
		}
		if !bytes.Equal(a.Data, inFlight) {
			t.Fatalf("step %d: the Data of the write in flight changed under it", i)
		}
		n := rng.IntN(len(a.Data)) // short: the flush never completes here
		r, err := ResultOK, error(nil)
		if rng.IntN(3) == 0 {
			r, err = ResultTimeout, os.ErrDeadlineExceeded // a wake-up
			timeouts++
		}
		e.WriteDone(now, n, r, err)
		sent += n
		shorts++
		expectState(t, e, fsm.Sending)
		if b := c.Buffered(); b != len(want)-sent {
			t.Fatalf("step %d: Buffered %d, want %d", i, b, len(want)-sent)
		}
		if rng.IntN(3) == 0 {
			appendOutside(1 + rng.IntN(3000))
			if rng.IntN(2) == 0 {
				e.HandleTimeout(now) // the driver saw Pending
			}
		}
	}
	a := e.Next(now)
	if !bytes.Equal(a.Data, want[sent:]) {
		t.Fatalf("the last write hands out %d bytes, want the %d unwritten", len(a.Data), len(want)-sent)
	}
	e.WriteDone(now, len(a.Data), ResultOK, nil)
	expect(t, e, now, OpRead, "", now.Add(testCfg.IdleTimeout))
	if info := e.CloseInfo(); info.BytesWritten != int64(len(want)) || info.Aborted() {
		t.Fatalf("info %+v; want %d bytes written", info, len(want))
	}
	t.Logf("%d bytes in %d short writes (%d wake-ups)", len(want), shorts, timeouts)
}

// --- d: the MaxPendingOutput boundary ---

// bsDrain adds OnDrain to testHandler.
type bsDrain struct {
	*testHandler
	drains int
}

func (h *bsDrain) OnDrain(*Conn) { h.drains++ }

// TestBlindOutputFullBoundary: output that exactly fills MaxPendingOutput is
// accepted whole (n == len, nil), one byte more is refused (ErrOutputFull,
// nothing queued), from a callback and from another goroutine; a Write
// beyond the room left by a short write queues the prefix that fits.
// Buffered and Available at each point; OnDrain once after each flush that
// followed an ErrOutputFull.
func TestBlindOutputFullBoundary(t *testing.T) {
	cfg := testCfg
	cfg.MaxPendingOutput = 8
	h := &bsDrain{testHandler: &testHandler{}}
	e := newTestEngine(t, cfg, h)
	e.Start(t0)
	c := e.Conn()
	bsRoom(t, c, 0, 8)

	// From a callback.
	h.onData = func(c *Conn, _ []byte) {
		if n, err := c.Write([]byte("12345678")); n != 8 || err != nil {
			t.Errorf("in OnData: Write of 8 = %d, %v; want 8, nil", n, err)
		}
		if b, a := c.Buffered(), c.Available(); b != 8 || a != 0 {
			t.Errorf("in OnData: Buffered %d, Available %d; want 8, 0", b, a)
		}
		if n, err := c.Write([]byte("9")); n != 0 || !errors.Is(err, ErrOutputFull) {
			t.Errorf("in OnData: Write of 1 more = %d, %v; want 0, ErrOutputFull", n, err)
		}
	}
	e.ReadDone(t0, []byte("x"), ResultOK, nil)
	bsRoom(t, c, 8, 0)
	expect(t, e, t0, OpWrite, "12345678", t0.Add(cfg.WriteTimeout))
	e.WriteDone(t0, 8, ResultOK, nil)
	bsRoom(t, c, 0, 8)
	if h.drains != 1 {
		t.Fatalf("OnDrain called %d times after the first flush, want 1", h.drains)
	}
	expect(t, e, t0, OpRead, "", t0.Add(cfg.IdleTimeout))

	// From another goroutine.
	bsWrite(t, c, "abcd", 4, nil)
	bsRoom(t, c, 4, 4)
	bsWrite(t, c, "efgh", 4, nil)
	bsRoom(t, c, 8, 0)
	bsWrite(t, c, "i", 0, ErrOutputFull)
	bsRoom(t, c, 8, 0)
	expect(t, e, t0, OpWrite, "abcdefgh", t0.Add(cfg.WriteTimeout))
	e.WriteDone(t0, 3, ResultOK, nil)
	bsRoom(t, c, 5, 3)
	bsWrite(t, c, "ijkl", 3, ErrOutputFull) // the prefix that fits
	bsRoom(t, c, 8, 0)
	expect(t, e, t0, OpWrite, "defghijk", t0.Add(cfg.WriteTimeout))
	if h.drains != 1 {
		t.Fatalf("OnDrain called before the queue drained")
	}
	e.WriteDone(t0, 8, ResultOK, nil)
	bsRoom(t, c, 0, 8)
	if h.drains != 2 {
		t.Fatalf("OnDrain called %d times, want 2", h.drains)
	}
	// Exactly full in one Write from another goroutine, flushed without an
	// ErrOutputFull: no OnDrain is owed.
	bsWrite(t, c, "ABCDEFGH", 8, nil)
	bsRoom(t, c, 8, 0)
	expect(t, e, t0, OpWrite, "ABCDEFGH", t0.Add(cfg.WriteTimeout))
	e.WriteDone(t0, 8, ResultOK, nil)
	if h.drains != 2 {
		t.Fatalf("OnDrain called %d times, want 2: no Write was refused", h.drains)
	}
	if info := e.CloseInfo(); info.BytesWritten != 27 {
		t.Fatalf("BytesWritten %d, want 27", info.BytesWritten)
	}
	// Once a close is asked for there is no room.
	c.Close()
	bsRoom(t, c, 0, 0)
	bsWrite(t, c, "x", 0, ErrShutdown)
}

// --- e: the idle timer after input the handler does not answer ---

// TestBlindIdleAfterUnansweredInput: input the handler does not answer
// restarts the idle timer at the input (the deadline in Next moves); a read
// that returns early with nothing does not; the connection half-closes only
// IdleTimeout after the last input.
func TestBlindIdleAfterUnansweredInput(t *testing.T) {
	e, h := receiving(t, testCfg) // deadline t0+10s
	h.onData = func(*Conn, []byte) {}
	at := t0.Add(4 * time.Second)
	e.ReadDone(at, []byte("ping"), ResultOK, nil)
	expectState(t, e, fsm.Receiving)
	expect(t, e, at, OpRead, "", at.Add(testCfg.IdleTimeout))
	e.ReadDone(t0.Add(6*time.Second), nil, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, t0.Add(6*time.Second), OpRead, "", at.Add(testCfg.IdleTimeout))
	// The first deadline passes: nothing happens.
	expect(t, e, t0.Add(testCfg.IdleTimeout), OpRead, "", at.Add(testCfg.IdleTimeout))
	// Another unanswered chunk, with a read that timed out at the same step.
	at2 := t0.Add(12 * time.Second)
	e.ReadDone(at2, []byte("pong"), ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, at2, OpRead, "", at2.Add(testCfg.IdleTimeout))
	expect(t, e, at2.Add(testCfg.IdleTimeout-time.Nanosecond), OpRead, "", at2.Add(testCfg.IdleTimeout))
	expect(t, e, at2.Add(testCfg.IdleTimeout), OpCloseWrite, "", time.Time{})
	if info := e.CloseInfo(); info.Reason != ReasonIdleTimeout || info.BytesRead != 8 || info.BytesWritten != 0 {
		t.Fatalf("info %+v", info)
	}
}

// TestBlindIdlePausedRead: while the handler has paused reading, the idle
// timer does not run (Next waits with no deadline however long it lasts,
// and a wake-up long after the idle deadline does not close), MaxLifetime
// still does; ResumeRead restarts the idle timer at the step that takes it.
func TestBlindIdlePausedRead(t *testing.T) {
	e, h := receiving(t, testCfg) // deadline t0+10s
	s := time.Second
	h.onData = func(c *Conn, _ []byte) { c.PauseRead() }
	e.ReadDone(t0.Add(2*s), []byte("x"), ResultOK, nil)
	expect(t, e, t0.Add(2*s), OpWait, "", time.Time{})
	expect(t, e, t0.Add(60*s), OpWait, "", time.Time{}) // long past the idle deadline
	bsOutside(t, func() { e.Conn().ResumeRead() })
	expect(t, e, t0.Add(61*s), OpRead, "", t0.Add(71*s))
	expect(t, e, t0.Add(71*s), OpCloseWrite, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonIdleTimeout {
		t.Fatalf("reason %s", r)
	}

	cfg := testCfg
	cfg.MaxLifetime = 30 * s
	e, h = receiving(t, cfg)
	h.onData = func(c *Conn, _ []byte) { c.PauseRead() }
	e.ReadDone(t0.Add(2*s), []byte("x"), ResultOK, nil)
	expect(t, e, t0.Add(2*s), OpWait, "", t0.Add(30*s))
	expect(t, e, t0.Add(30*s), OpCloseWrite, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonMaxLifetime {
		t.Fatalf("reason %s", r)
	}
}

// --- f: IdleTimeout for a push-only connection ---

// TestBlindIdlePushOnly: a connection that never reads anything but is
// pushed to from another goroutine stays open as long as the pushes come:
// each flush restarts the idle timer when it completes (a short write does
// not), and only IdleTimeout with nothing read and nothing written closes
// it.
func TestBlindIdlePushOnly(t *testing.T) {
	e, _ := receiving(t, testCfg) // deadline t0+10s
	c := e.Conn()
	s := time.Second

	bsWrite(t, c, "push1", 5, nil)
	expect(t, e, t0.Add(6*s), OpWrite, "push1", t0.Add(6*s).Add(testCfg.WriteTimeout))
	e.WriteDone(t0.Add(7*s), 5, ResultOK, nil)
	expect(t, e, t0.Add(7*s), OpRead, "", t0.Add(17*s))
	// The deadline before the push passes: nothing happens.
	expect(t, e, t0.Add(testCfg.IdleTimeout), OpRead, "", t0.Add(17*s))

	// A push flushed in two writes: the timer restarts when the second
	// completes.
	bsWrite(t, c, "push2", 5, nil)
	expect(t, e, t0.Add(16*s), OpWrite, "push2", t0.Add(16*s).Add(testCfg.WriteTimeout))
	e.WriteDone(t0.Add(18*s), 2, ResultOK, nil)
	expect(t, e, t0.Add(18*s), OpWrite, "sh2", t0.Add(16*s).Add(testCfg.WriteTimeout))
	e.WriteDone(t0.Add(19*s), 3, ResultOK, nil)
	expect(t, e, t0.Add(19*s), OpRead, "", t0.Add(29*s))
	expect(t, e, t0.Add(29*s-time.Nanosecond), OpRead, "", t0.Add(29*s))
	expect(t, e, t0.Add(29*s), OpCloseWrite, "", time.Time{})
	if info := e.CloseInfo(); info.Reason != ReasonIdleTimeout || info.BytesRead != 0 || info.BytesWritten != 10 {
		t.Fatalf("info %+v", info)
	}
}

// --- g: requests and the waker ---

// bsWaker counts the waker's calls and keeps the operation it was last told
// to interrupt.
type bsWaker struct {
	n  atomic.Int32
	op atomic.Uint32
}

func (w *bsWaker) Load() int32 { return w.n.Load() }

// bsWakerEngine returns an engine with a counting waker.
func bsWakerEngine(t *testing.T, h *testHandler) (*Engine, *bsWaker) {
	t.Helper()
	e := newTestEngine(t, testCfg, h)
	w := &bsWaker{}
	e.SetWaker(func(op Op) {
		w.n.Add(1)
		w.op.Store(uint32(op))
	})
	return e, w
}

// TestBlindRequestsAndWaker: a request from another goroutine marks itself
// pending and calls the waker exactly once, telling it the operation in
// flight, when that operation must end first for it: a read or a wait for any request, the start (a
// handshake) for a close or an abort, a write or a half-close for an abort
// only. A request from within a callback (or a Do function) neither calls
// the waker nor leaves anything pending: the step in progress takes it.
func TestBlindRequestsAndWaker(t *testing.T) {
	type setup func(t *testing.T, e *Engine, h *testHandler)
	inFlight := map[Op]setup{
		OpStart: func(t *testing.T, e *Engine, h *testHandler) { expect(t, e, t0, OpStart, "", time.Time{}) },
		OpRead: func(t *testing.T, e *Engine, h *testHandler) {
			e.Start(t0)
			expect(t, e, t0, OpRead, "", t0.Add(testCfg.IdleTimeout))
		},
		OpWait: func(t *testing.T, e *Engine, h *testHandler) {
			e.Start(t0)
			e.Conn().PauseRead()
			expect(t, e, t0, OpWait, "", time.Time{})
		},
		OpWrite: func(t *testing.T, e *Engine, h *testHandler) {
			e.Start(t0)
			e.ReadDone(t0, []byte("x"), ResultOK, nil)
			expect(t, e, t0, OpWrite, "x", t0.Add(testCfg.WriteTimeout))
		},
		OpCloseWrite: func(t *testing.T, e *Engine, h *testHandler) {
			e.Start(t0)
			expect(t, e, t0.Add(testCfg.IdleTimeout), OpCloseWrite, "", time.Time{})
		},
	}
	requests := map[string]func(e *Engine){
		"Write":      func(e *Engine) { e.Conn().Write([]byte("w")) },
		"Do":         func(e *Engine) { e.Conn().Do(func(*Conn) {}) },
		"ResumeRead": func(e *Engine) { e.Conn().ResumeRead() },
		"PauseRead":  func(e *Engine) { e.Conn().PauseRead() },
		"CloseWrite": func(e *Engine) { e.Conn().CloseWrite() },
		"Close":      func(e *Engine) { e.Conn().Close() },
		"EngineClose": func(e *Engine) {
			e.Close()
		},
		"Abort":       func(e *Engine) { e.Conn().Abort(nil) },
		"EngineAbort": func(e *Engine) { e.Abort(nil) },
	}
	for _, tc := range []struct {
		op       Op
		request  string
		wake     bool
		pending  bool
		wantNext Op // after the driver handles it
	}{
		{OpRead, "Write", true, true, OpWrite},
		{OpRead, "Do", true, true, OpRead},
		{OpRead, "CloseWrite", true, true, OpCloseWrite},
		{OpRead, "Close", true, true, OpCloseWrite},
		{OpRead, "EngineClose", true, true, OpRead}, // a new connection: the close waits for its first input (FirstInputGrace)
		{OpRead, "Abort", true, true, OpAbort},
		{OpRead, "EngineAbort", true, true, OpAbort},
		{OpRead, "PauseRead", false, false, OpWait},
		{OpRead, "ResumeRead", false, false, OpRead}, // not paused: no request
		{OpWait, "ResumeRead", true, true, OpRead},
		{OpWait, "Write", true, true, OpWrite},
		{OpWait, "Do", true, true, OpWait},
		{OpWait, "Abort", true, true, OpAbort},
		{OpWrite, "Write", false, true, OpWrite},
		{OpWrite, "Do", false, true, OpWrite},
		{OpWrite, "Close", false, true, OpWrite},
		{OpWrite, "EngineClose", false, true, OpWrite},
		{OpWrite, "Abort", true, true, OpAbort},
		{OpWrite, "EngineAbort", true, true, OpAbort},
		{OpStart, "Write", false, true, OpStart},
		{OpStart, "Do", false, true, OpStart},
		{OpStart, "Close", true, true, OpClose},
		{OpStart, "EngineClose", true, true, OpClose},
		{OpStart, "Abort", true, true, OpAbort},
		{OpCloseWrite, "Write", false, false, OpCloseWrite},      // refused: ErrShutdown
		{OpCloseWrite, "CloseWrite", false, false, OpCloseWrite}, // changes nothing: the idle timeout asked for a full close
		{OpCloseWrite, "Close", false, false, OpCloseWrite},      // the same
		{OpCloseWrite, "Abort", true, true, OpAbort},
	} {
		t.Run(tc.op.String()+"/"+tc.request, func(t *testing.T) {
			h := &testHandler{}
			e, wakes := bsWakerEngine(t, h)
			inFlight[tc.op](t, e, h)
			if wakes.Load() != 0 || e.Pending() {
				t.Fatalf("before the request: %d wake-ups, pending %v", wakes.Load(), e.Pending())
			}
			bsOutside(t, func() { requests[tc.request](e) })
			want := int32(0)
			if tc.wake {
				want = 1
			}
			if n := wakes.Load(); n != want || e.Pending() != tc.pending {
				t.Fatalf("%s while %s is in flight: %d wake-ups, pending %v; want %d, %v", tc.request, tc.op, n, e.Pending(), want, tc.pending)
			}
			if op := Op(wakes.op.Load()); tc.wake && op != tc.op {
				t.Fatalf("the waker was told to interrupt %s; %s is in flight", op, tc.op)
			}
			// The driver's next step takes it.
			e.HandleTimeout(t0)
			if e.Pending() {
				t.Fatal("still pending after a step")
			}
			if a := e.Next(t0); a.Op != tc.wantNext {
				t.Fatalf("after the step: Next = %s, want %s", a.Op, tc.wantNext)
			}
			if n := wakes.Load(); n != want {
				t.Fatalf("%d wake-ups after the step, want %d", n, want)
			}
		})
	}

	t.Run("WithinCallbacks", func(t *testing.T) {
		h := &testHandler{}
		e, wakes := bsWakerEngine(t, h)
		check := func(where string, c *Conn) {
			t.Helper()
			if e.Pending() {
				t.Errorf("%s: a request is left pending", where)
			}
			if n := wakes.Load(); n != 0 {
				t.Errorf("%s: %d wake-ups", where, n)
			}
		}
		every := func(where string, c *Conn) {
			c.Write([]byte(where[:1]))
			check(where+": Write", c)
			c.Do(func(c *Conn) {
				c.Write([]byte("d"))
				c.PauseRead()
				c.ResumeRead()
				check(where+": in a Do function", c)
			})
			check(where+": Do", c)
			c.PauseRead()
			c.ResumeRead()
			check(where+": PauseRead, ResumeRead", c)
		}
		h.onOpen = func(c *Conn) { every("open", c) }
		h.onData = func(c *Conn, p []byte) {
			every("data", c)
			if string(p) == "bye" {
				c.CloseWrite()
				check("data: CloseWrite", c)
				e.Close()
				check("data: Engine.Close", c)
				c.Abort(nil)
				check("data: Abort", c)
			}
		}
		// Each step is taken right after the Next that hands its
		// operation out, as a driver does: the operation is in flight.
		expect(t, e, t0, OpStart, "", time.Time{})
		e.Start(t0)
		expect(t, e, t0, OpWrite, "od", t0.Add(testCfg.WriteTimeout))
		e.WriteDone(t0, 2, ResultOK, nil)
		expect(t, e, t0, OpRead, "", t0.Add(testCfg.IdleTimeout))
		e.ReadDone(t0, []byte("hi"), ResultOK, nil)
		expect(t, e, t0, OpWrite, "dd", t0.Add(testCfg.WriteTimeout))
		e.WriteDone(t0, 2, ResultOK, nil)
		expect(t, e, t0, OpRead, "", t0.Add(testCfg.IdleTimeout))
		e.ReadDone(t0, []byte("bye"), ResultOK, nil)
		expect(t, e, t0, OpAbort, "", time.Time{})
		e.CloseDone(t0)
		if n := wakes.Load(); n != 0 {
			t.Fatalf("%d wake-ups from requests made within callbacks", n)
		}
		if len(h.infos) != 1 || h.infos[0].Reason != ReasonHandlerAbort {
			t.Fatalf("infos %+v", h.infos)
		}
	})
}

// TestBlindDoFloodDoesNotStarveTheDriver: a task that queues another each
// time it runs (a flood of Do) does not keep the driver inside one step:
// each step runs the tasks queued before it and leaves the rest pending, so
// an abort, a timer or the server's deadline is taken at the next step.
func TestBlindDoFloodDoesNotStarveTheDriver(t *testing.T) {
	e, _ := receiving(t, testCfg)
	runs := 0
	var f func(c *Conn)
	f = func(c *Conn) {
		runs++
		if err := c.Do(f); err != nil && runs < 3 {
			t.Errorf("Do from a task: %v", err)
		}
	}
	if err := e.Conn().Do(f); err != nil {
		t.Fatal(err)
	}
	e.HandleTimeout(t0)
	if runs != 1 || !e.Pending() {
		t.Fatalf("after one step: %d runs, pending %v; want 1 run and the next task pending", runs, e.Pending())
	}
	e.Abort(nil)
	e.HandleTimeout(t0)
	if runs != 2 || e.State() != fsm.Aborting {
		t.Fatalf("after the abort's step: %d runs, state %s; want 2 runs and aborting", runs, e.State())
	}
	e.CloseDone(t0) // the task queued last runs before OnClose, as Do promises; the one it queues is refused
	if runs != 3 || e.State() != fsm.Closed {
		t.Fatalf("after CloseDone: %d runs, state %s", runs, e.State())
	}
	if err := e.Conn().Do(f); !errors.Is(err, ErrClosed) {
		t.Fatalf("Do after OnClose: %v, want ErrClosed", err)
	}
}

// unhashableListener is a net.Listener that cannot be a map key: it holds
// a func.
type unhashableListener struct {
	net.Listener
	onAccept func()
}

// Accept implements net.Listener.
func (l unhashableListener) Accept() (net.Conn, error) {
	if l.onAccept != nil {
		l.onAccept()
	}
	return l.Listener.Accept()
}

// TestBlindServeUnhashableListener: Serve takes any net.Listener, even one
// that cannot be compared (net/http keys its listeners by pointer too).
func TestBlindServeUnhashableListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newEchoServer(0)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(unhashableListener{Listener: ln, onAccept: func() {}}) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// TestBlindWriteTimeoutPerFlushOfQueuedBytes: WriteTimeout bounds the
// flush of the bytes queued when it began. Bytes pushed from another
// goroutine during the flush are a flush of their own, timed from when the
// first is done, so a pusher that keeps the queue from emptying does not
// shorten a reader's time; a peer that stops reading is still aborted one
// WriteTimeout after its last completed flush.
func TestBlindWriteTimeoutPerFlushOfQueuedBytes(t *testing.T) {
	cfg := testCfg // WriteTimeout 20s
	e, _ := receiving(t, cfg)
	c := e.Conn()
	c.Write(bytes.Repeat([]byte("a"), 100))
	a := expect(t, e, t0, OpWrite, string(bytes.Repeat([]byte("a"), 100)), t0.Add(cfg.WriteTimeout))
	_ = a
	c.Write(bytes.Repeat([]byte("b"), 100)) // pushed during the flush
	// The first 100 bytes go out just before their deadline.
	at := t0.Add(cfg.WriteTimeout - time.Second)
	e.WriteDone(at, 150, ResultOK, nil)
	// The pushed bytes have a WriteTimeout of their own, from there.
	if a := expect(t, e, at, OpWrite, string(bytes.Repeat([]byte("b"), 50)), at.Add(cfg.WriteTimeout)); len(a.Data) != 50 {
		t.Fatalf("data %d", len(a.Data))
	}
	later := t0.Add(cfg.WriteTimeout + 5*time.Second) // past the first flush's deadline
	e.WriteDone(later, 10, ResultOK, nil)
	expect(t, e, later, OpWrite, string(bytes.Repeat([]byte("b"), 40)), at.Add(cfg.WriteTimeout))
	// The peer stops reading: the second flush's deadline aborts.
	e.WriteDone(at.Add(cfg.WriteTimeout), 0, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, at.Add(cfg.WriteTimeout), OpAbort, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonWriteTimeout {
		t.Fatalf("reason %s", r)
	}
}

// TestBlindEngineCloseFromATask: Engine.Close made while a Do task runs
// (the lock released, a step in progress) is taken by that step, not lost
// until the next input.
func TestBlindEngineCloseFromATask(t *testing.T) {
	e, _ := receiving(t, testCfg)
	if err := e.Conn().Do(func(*Conn) { e.Close() }); err != nil {
		t.Fatal(err)
	}
	e.HandleTimeout(t0)
	// The connection has read nothing: the close waits FirstInputGrace
	// for its first input, then is taken.
	expect(t, e, t0, OpRead, "", t0.Add(FirstInputGrace))
	later := t0.Add(FirstInputGrace)
	e.HandleTimeout(later)
	if a := e.Next(later); a.Op != OpCloseWrite || e.CloseInfo().Reason != ReasonShutdown {
		t.Fatalf("after a task closed the engine: %v in %s (reason %s); want close-write", a.Op, e.State(), e.CloseInfo().Reason)
	}
}

// TestBlindHeldHalfCloseIsNotBounded: after a held connection's half-close
// (a net.Conn's CloseWrite) its application still reads, so the linger
// bounds do not cut its input; they start when it closes.
func TestBlindHeldHalfCloseIsNotBounded(t *testing.T) {
	cfg := testCfg // LingerBytes 100, LingerTimeout 3s, LingerTime 7s
	h := &testHandler{onOpen: func(c *Conn) { c.Hold() }, onData: func(*Conn, []byte) {}}
	e := newTestEngine(t, cfg, h)
	e.Start(t0)
	e.Conn().CloseWrite()
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
	e.CloseWriteDone(t0, ResultOK, nil)
	expect(t, e, t0, OpRead, "", time.Time{}) // no linger deadline
	late := t0.Add(time.Hour)
	e.ReadDone(late, make([]byte, 500), ResultOK, nil) // past LingerBytes
	expect(t, e, late, OpRead, "", time.Time{})
	if len(h.received) != 500 {
		t.Fatalf("the handler got %d bytes, want 500", len(h.received))
	}
	// The application closes: the linger starts now, with its bounds.
	e.Conn().Close()
	expect(t, e, late, OpRead, "", late.Add(cfg.LingerTimeout))
	e.ReadDone(late, make([]byte, 100), ResultOK, nil)
	expect(t, e, late, OpClose, "", time.Time{})
	if info := e.CloseInfo(); info.Linger != LingerEndBytes || info.Discarded != 100 {
		t.Fatalf("info %+v", info)
	}
}
