package sockfsm

// Unit tests of the I/O-free Engine, one section per state (in the manner of
// smoltcp's tcp.rs): the test is the driver, and time is whatever it says.

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// testHandler echoes unless told otherwise, and records its callbacks.
type testHandler struct {
	onData   func(c *Conn, p []byte)
	onOpen   func(c *Conn)
	onPeer   func(c *Conn)
	calls    []string
	infos    []CloseInfo
	received []byte
}

func (h *testHandler) OnOpen(c *Conn) {
	h.calls = append(h.calls, "open")
	if h.onOpen != nil {
		h.onOpen(c)
	}
}

func (h *testHandler) OnData(c *Conn, p []byte) {
	h.calls = append(h.calls, "data")
	h.received = append(h.received, p...)
	if h.onData != nil {
		h.onData(c, p)
		return
	}
	c.Write(p)
}

func (h *testHandler) OnPeerClose(c *Conn) {
	h.calls = append(h.calls, "peer-close")
	if h.onPeer != nil {
		h.onPeer(c)
	}
}

func (h *testHandler) OnClose(c *Conn, info CloseInfo) {
	h.calls = append(h.calls, "close")
	h.infos = append(h.infos, info)
}

var testCfg = Config{
	Logger:      slog.New(discardHandler{}),
	IdleTimeout: 10 * time.Second, WriteTimeout: 20 * time.Second,
	LingerTimeout: 3 * time.Second, LingerTime: 7 * time.Second, LingerBytes: 100,
	MinRate: -1, // its own tests turn it on: minrate_test.go
}

func newTestEngine(t *testing.T, cfg Config, h Handler) *Engine {
	t.Helper()
	e, err := NewEngine(cfg, h, ConnInfo{ID: 7})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// expect handles what is due at now, as a driver does when a deadline
// passes, and asserts the next action.
func expect(t *testing.T, e *Engine, now time.Time, op Op, data string, deadline time.Time) Action {
	t.Helper()
	e.HandleTimeout(now)
	a := e.Next(now)
	if a.Op != op || string(a.Data) != data || !a.Deadline.Equal(deadline) {
		t.Fatalf("Next = {%s %q %v}, want {%s %q %v} (state %s)", a.Op, a.Data, a.Deadline, op, data, deadline, e.State())
	}
	return a
}

func expectState(t *testing.T, e *Engine, s fsm.State) {
	t.Helper()
	if e.State() != s {
		t.Fatalf("state %s, want %s", e.State(), s)
	}
}

// receiving returns an echo engine started at t0, in Receiving.
func receiving(t *testing.T, cfg Config) (*Engine, *testHandler) {
	h := &testHandler{}
	e := newTestEngine(t, cfg, h)
	expect(t, e, t0, OpStart, "", time.Time{})
	e.Start(t0)
	expect(t, e, t0, OpRead, "", t0.Add(cfg.IdleTimeout))
	expectState(t, e, fsm.Receiving)
	return e, h
}

// halfClosed returns an echo engine that has sent its FIN at t0 after an
// idle timeout.
func halfClosed(t *testing.T, cfg Config) (*Engine, *testHandler) {
	e, h := receiving(t, cfg)
	expect(t, e, t0.Add(cfg.IdleTimeout), OpCloseWrite, "", time.Time{})
	expectState(t, e, fsm.HalfClosing) // the FIN is not out yet
	e.CloseWriteDone(t0, ResultOK, nil)
	expectState(t, e, fsm.HalfClosed)
	return e, h
}

// --- Accepted ---

func TestAcceptedStartsAndOpens(t *testing.T) {
	h := &testHandler{onOpen: func(c *Conn) { c.Write([]byte("hello\n")) }}
	e := newTestEngine(t, testCfg, h)
	expectState(t, e, fsm.Accepted)
	expect(t, e, t0, OpStart, "", time.Time{})
	e.Start(t0)
	expect(t, e, t0, OpWrite, "hello\n", t0.Add(testCfg.WriteTimeout))
	expectState(t, e, fsm.Sending)
	if strings.Join(h.calls, ",") != "open" {
		t.Fatalf("calls %v", h.calls)
	}
}

func TestAcceptedAbort(t *testing.T) {
	h := &testHandler{}
	e := newTestEngine(t, testCfg, h)
	e.Abort(ErrShutdownDeadline)
	expectState(t, e, fsm.Accepted) // a request: the driver's next step takes it
	if !e.Pending() {
		t.Fatal("Abort left nothing pending")
	}
	expect(t, e, t0, OpAbort, "", time.Time{})
	expectState(t, e, fsm.Aborting) // the transport is not closed yet
	e.CloseDone(t0)
	expectState(t, e, fsm.Closed)
	expect(t, e, t0, OpDone, "", time.Time{})
	if len(h.infos) != 1 || h.infos[0].Reason != ReasonShutdownDeadline || !errors.Is(h.infos[0].Err, ErrShutdownDeadline) {
		t.Fatalf("infos %+v", h.infos)
	}
}

// --- Receiving ---

func TestReceivingEchoesAndResetsIdle(t *testing.T) {
	e, h := receiving(t, testCfg)
	at := t0.Add(4 * time.Second)
	e.ReadDone(at, []byte("abc"), ResultOK, nil)
	expectState(t, e, fsm.Sending)
	expect(t, e, at, OpWrite, "abc", at.Add(testCfg.WriteTimeout))
	flushed := at.Add(time.Second)
	e.WriteDone(flushed, 3, ResultOK, nil)
	expectState(t, e, fsm.Receiving)
	// The idle timer restarts when Receiving is entered again.
	expect(t, e, flushed, OpRead, "", flushed.Add(testCfg.IdleTimeout))
	if string(h.received) != "abc" {
		t.Fatalf("received %q", h.received)
	}
}

func TestReceivingIdleTimeoutHalfCloses(t *testing.T) {
	e, _ := receiving(t, testCfg)
	// A read that returns early from its deadline changes nothing.
	e.ReadDone(t0.Add(time.Second), nil, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, t0.Add(time.Second), OpRead, "", t0.Add(testCfg.IdleTimeout))
	e.ReadDone(t0.Add(testCfg.IdleTimeout), nil, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, t0.Add(testCfg.IdleTimeout), OpCloseWrite, "", time.Time{})
	if e.CloseInfo().Reason != ReasonIdleTimeout {
		t.Fatalf("reason %s", e.CloseInfo().Reason)
	}
}

func TestReceivingIdleOff(t *testing.T) {
	cfg := testCfg
	cfg.IdleTimeout = -1
	e := newTestEngine(t, cfg, &testHandler{})
	e.Start(t0)
	expect(t, e, t0, OpRead, "", time.Time{})
}

func TestReceivingMaxLifetime(t *testing.T) {
	cfg := testCfg
	cfg.MaxLifetime = 15 * time.Second
	e, _ := receiving(t, cfg)
	// Input keeps the idle timer away; the lifetime still ends it.
	for i := 1; i <= 14; i++ {
		at := t0.Add(time.Duration(i) * time.Second)
		e.ReadDone(at, []byte("x"), ResultOK, nil)
		e.Next(at)
		e.WriteDone(at, 1, ResultOK, nil)
	}
	expect(t, e, t0.Add(14*time.Second), OpRead, "", t0.Add(15*time.Second))
	expect(t, e, t0.Add(15*time.Second), OpCloseWrite, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonMaxLifetime {
		t.Fatalf("reason %s", r)
	}
}

func TestReceivingPeerFINClosesAtOnce(t *testing.T) {
	e, h := receiving(t, testCfg)
	h.onPeer = func(c *Conn) { c.Write([]byte("bye")) }
	e.ReadDone(t0, []byte("hi"), ResultEOF, io.EOF) // data and EOF together
	expect(t, e, t0, OpWrite, "hibye", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0, 5, ResultOK, nil)
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
	e.CloseWriteDone(t0, ResultOK, nil)
	expect(t, e, t0, OpClose, "", time.Time{}) // no linger: the peer's FIN was seen
	e.CloseDone(t0)
	expect(t, e, t0, OpDone, "", time.Time{})
	want := "open,data,peer-close,close"
	if got := strings.Join(h.calls, ","); got != "data,peer-close,close" && got != want {
		t.Fatalf("calls %s", got)
	}
	info := h.infos[0]
	if info.Reason != ReasonPeerClosed || info.Linger != LingerEndNone || !info.PeerFIN || info.BytesRead != 2 || info.BytesWritten != 5 {
		t.Fatalf("info %+v", info)
	}
}

func TestReceivingResetAndErrors(t *testing.T) {
	for _, tc := range []struct {
		err    error
		reason Reason
		is     error
	}{
		{syscall.ECONNRESET, ReasonPeerReset, ErrPeerReset},
		{errors.New("disk on fire"), ReasonReadError, ErrIO},
	} {
		e, h := receiving(t, testCfg)
		e.ReadDone(t0, nil, Classify(tc.err), tc.err)
		expect(t, e, t0, OpAbort, "", time.Time{})
		e.CloseDone(t0)
		if info := h.infos[0]; info.Reason != tc.reason || !errors.Is(info.Err, tc.is) || !errors.Is(info.Err, tc.err) || !info.Aborted() {
			t.Fatalf("%v: info %+v", tc.err, info)
		}
	}
}

func TestHandlerPanicAborts(t *testing.T) {
	e, h := receiving(t, testCfg)
	h.onData = func(*Conn, []byte) { panic("boom") }
	e.ReadDone(t0, []byte("x"), ResultOK, nil)
	expect(t, e, t0, OpAbort, "", time.Time{})
	e.CloseDone(t0)
	var pe *PanicError
	if info := h.infos[0]; info.Reason != ReasonHandlerPanic || !errors.As(info.Err, &pe) || pe.Value != "boom" || len(pe.Stack) == 0 {
		t.Fatalf("info %+v", info)
	}
}

func TestWriteOutputFull(t *testing.T) {
	cfg := testCfg
	cfg.MaxPendingOutput = 4
	e, h := receiving(t, cfg)
	var n1, n2 int
	var err1, err2 error
	h.onData = func(c *Conn, p []byte) {
		n1, err1 = c.Write([]byte("abc"))
		n2, err2 = c.Write([]byte("def"))
	}
	e.ReadDone(t0, []byte("x"), ResultOK, nil)
	if n1 != 3 || err1 != nil || n2 != 1 || !errors.Is(err2, ErrOutputFull) {
		t.Fatalf("writes: %d %v, %d %v", n1, err1, n2, err2)
	}
	expect(t, e, t0, OpWrite, "abcd", t0.Add(cfg.WriteTimeout))
}

// --- Sending ---

// TestSendingWokenWriteResumes: a write stopped early by a wake-up (its
// deadline moved into the past) resumes where it stopped; one stopped by the
// engine's own deadline aborts.
func TestSendingWokenWriteResumes(t *testing.T) {
	e, _ := receiving(t, testCfg)
	e.ReadDone(t0, []byte("hello"), ResultOK, nil)
	expect(t, e, t0, OpWrite, "hello", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0.Add(time.Second), 2, ResultTimeout, os.ErrDeadlineExceeded)
	expectState(t, e, fsm.Sending)
	expect(t, e, t0.Add(time.Second), OpWrite, "llo", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0.Add(testCfg.WriteTimeout), 1, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, t0.Add(testCfg.WriteTimeout), OpAbort, "", time.Time{})
	if info := e.CloseInfo(); info.Reason != ReasonWriteTimeout || info.BytesWritten != 3 {
		t.Fatalf("info %+v", info)
	}
}

func TestSendingResumesAfterShortWrite(t *testing.T) {
	e, _ := receiving(t, testCfg)
	e.ReadDone(t0, []byte("hello"), ResultOK, nil)
	e.Next(t0)
	e.WriteDone(t0, 2, ResultOK, nil)
	// The deadline covers the whole flush: it does not move with progress.
	expect(t, e, t0.Add(time.Second), OpWrite, "llo", t0.Add(testCfg.WriteTimeout))
}

func TestSendingWriteTimeoutAborts(t *testing.T) {
	e, h := receiving(t, testCfg)
	e.ReadDone(t0, []byte("hello"), ResultOK, nil)
	e.Next(t0)
	expect(t, e, t0.Add(testCfg.WriteTimeout), OpAbort, "", time.Time{})
	e.CloseDone(t0.Add(testCfg.WriteTimeout))
	if info := h.infos[0]; info.Reason != ReasonWriteTimeout || !errors.Is(info.Err, ErrWriteTimeout) {
		t.Fatalf("info %+v", info)
	}
}

func TestSendingFlushesBeforeHalfClose(t *testing.T) {
	e, h := receiving(t, testCfg)
	h.onData = func(c *Conn, p []byte) {
		c.Write(p)
		c.Close()
		if n, err := c.Write(p); n != 0 || !errors.Is(err, ErrShutdown) {
			t.Errorf("write after Close: %d, %v", n, err)
		}
	}
	e.ReadDone(t0, []byte("last"), ResultOK, nil)
	expect(t, e, t0, OpWrite, "last", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0, 4, ResultOK, nil)
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
}

// --- HalfClosed ---

func TestHalfClosedLingerDeadlines(t *testing.T) {
	e, _ := halfClosed(t, testCfg)
	// The per-read bound comes first...
	expect(t, e, t0, OpRead, "", t0.Add(testCfg.LingerTimeout))
	// ...and moves with each read, until the total bound is nearer.
	e.ReadDone(t0.Add(2*time.Second), []byte("xx"), ResultOK, nil)
	expect(t, e, t0.Add(2*time.Second), OpRead, "", t0.Add(5*time.Second))
	e.ReadDone(t0.Add(5*time.Second), []byte("yy"), ResultOK, nil)
	expect(t, e, t0.Add(5*time.Second), OpRead, "", t0.Add(testCfg.LingerTime))
	expect(t, e, t0.Add(testCfg.LingerTime), OpClose, "", time.Time{})
	info := e.CloseInfo()
	if info.Linger != LingerEndTime || info.Discarded != 4 || info.Aborted() {
		t.Fatalf("info %+v", info)
	}
}

func TestHalfClosedLingerTimeout(t *testing.T) {
	e, _ := halfClosed(t, testCfg)
	e.ReadDone(t0.Add(testCfg.LingerTimeout), nil, ResultTimeout, os.ErrDeadlineExceeded)
	expect(t, e, t0.Add(testCfg.LingerTimeout), OpClose, "", time.Time{})
	if e.CloseInfo().Linger != LingerEndTimeout {
		t.Fatalf("linger %s", e.CloseInfo().Linger)
	}
}

func TestHalfClosedLingerBytes(t *testing.T) {
	e, h := halfClosed(t, testCfg)
	e.ReadDone(t0, make([]byte, testCfg.LingerBytes), ResultOK, nil)
	expect(t, e, t0, OpClose, "", time.Time{})
	if e.CloseInfo().Linger != LingerEndBytes || len(h.received) != 0 {
		t.Fatalf("linger %s; handler got %d bytes", e.CloseInfo().Linger, len(h.received))
	}
}

func TestHalfClosedPeerFIN(t *testing.T) {
	e, h := halfClosed(t, testCfg)
	e.ReadDone(t0.Add(time.Second), []byte("late"), ResultEOF, io.EOF)
	expect(t, e, t0.Add(time.Second), OpClose, "", time.Time{})
	e.CloseDone(t0.Add(time.Second))
	info := h.infos[0]
	if info.Linger != LingerEndPeerFIN || info.Reason != ReasonIdleTimeout || info.Discarded != 4 || !info.PeerFIN {
		t.Fatalf("info %+v", info)
	}
}

func TestHalfClosedHandlerHalfCloseStillReceives(t *testing.T) {
	e, h := receiving(t, testCfg)
	h.onData = func(c *Conn, p []byte) {
		if string(p) == "first" {
			c.Write([]byte("answer"))
			c.CloseWrite()
		}
		if _, err := c.Write(p); !errors.Is(err, ErrShutdown) {
			t.Errorf("write after CloseWrite: %v", err)
		}
	}
	e.ReadDone(t0, []byte("first"), ResultOK, nil)
	expect(t, e, t0, OpWrite, "answer", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0, 6, ResultOK, nil)
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
	e.CloseWriteDone(t0, ResultOK, nil)
	e.ReadDone(t0, []byte("more"), ResultOK, nil)
	if string(h.received) != "firstmore" {
		t.Fatalf("handler received %q", h.received)
	}
	if e.CloseInfo().Discarded != 0 {
		t.Fatal("half-close mode discarded input")
	}
}

func TestHalfClosedCloseWriteError(t *testing.T) {
	e, _ := receiving(t, testCfg)
	expect(t, e, t0.Add(testCfg.IdleTimeout), OpCloseWrite, "", time.Time{})
	e.CloseWriteDone(t0, ResultReset, syscall.ECONNRESET)
	expect(t, e, t0, OpAbort, "", time.Time{})
}

// --- Closed ---

func TestClosedIsTerminal(t *testing.T) {
	e, h := halfClosed(t, testCfg)
	e.ReadDone(t0, nil, ResultEOF, io.EOF)
	expect(t, e, t0, OpClose, "", time.Time{})
	e.CloseDone(t0)
	// Nothing the driver or the server does afterwards changes anything.
	e.ReadDone(t0, []byte("x"), ResultOK, nil)
	e.WriteDone(t0, 1, ResultOK, nil)
	e.CloseWriteDone(t0, ResultOK, nil)
	if err := e.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("Close when closed: %v", err)
	}
	e.Abort(nil)
	e.CloseDone(t0)
	for range 3 {
		expect(t, e, t0.Add(time.Hour), OpDone, "", time.Time{})
	}
	if len(h.infos) != 1 || h.infos[0].Reason != ReasonIdleTimeout {
		t.Fatalf("OnClose %d times: %+v", len(h.infos), h.infos)
	}
	if _, err := e.Conn().Write([]byte("x")); !errors.Is(err, ErrShutdown) {
		t.Fatalf("write when closed: %v", err)
	}
}

// --- Server shutdown ---

func TestShutdownWhileSendingFlushesFirst(t *testing.T) {
	e, _ := receiving(t, testCfg)
	e.ReadDone(t0, []byte("in flight"), ResultOK, nil)
	e.Next(t0)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	expect(t, e, t0, OpWrite, "in flight", t0.Add(testCfg.WriteTimeout))
	e.WriteDone(t0, 9, ResultOK, nil)
	expect(t, e, t0, OpCloseWrite, "", time.Time{})
	if e.CloseInfo().Reason != ReasonShutdown {
		t.Fatalf("reason %s", e.CloseInfo().Reason)
	}
}

// --- Config ---

func TestConfigValidate(t *testing.T) {
	for _, bad := range []Config{
		{WriteTimeout: -1}, {LingerTime: -1}, {ReadBufferSize: -1}, {MaxPendingOutput: -1}, {MaxConns: -1},
		{MinRate: maxMinRate + 1}, {MinRateWindow: maxMinRateWindow + 1},
	} {
		if err := bad.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.HasPrefix(err.Error(), "sockfsm: ") {
			t.Errorf("%+v: %v", bad, err)
		}
		if _, err := NewEngine(bad, Echo{}, ConnInfo{}); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewEngine(%+v): %v", bad, err)
		}
	}
	if err := (Config{IdleTimeout: -1, LingerTimeout: -1, LingerBytes: -1, MaxLifetime: -1}).Validate(); err != nil {
		t.Errorf("off values refused: %v", err)
	}
	if _, err := NewEngine(Config{}, nil, ConnInfo{}); !errors.Is(err, ErrNoHandler) {
		t.Errorf("nil handler: %v", err)
	}
}

func TestConfigDefaultsAndOff(t *testing.T) {
	l := Config{}.limits()
	want := limits{idle: DefaultIdleTimeout, write: DefaultWriteTimeout, lingerTimeout: DefaultLingerTimeout,
		lingerTime: DefaultLingerTime, lingerBytes: DefaultLingerBytes, readBuf: DefaultReadBufferSize, maxOut: DefaultMaxPendingOutput,
		rateWindow: DefaultMinRateWindow, rateBytes: DefaultMinRate * int64(DefaultMinRateWindow/time.Second)}
	if l != want {
		t.Errorf("defaults %+v, want %+v", l, want)
	}
	off := Config{IdleTimeout: -1, LingerTimeout: -5, LingerBytes: -1, MaxLifetime: -1, MinRate: -1}.limits()
	if off.idle != 0 || off.lingerTimeout != 0 || off.lingerBytes != 0 || off.lifetime != 0 || off.rateWindow != 0 || off.rateBytes != 0 {
		t.Errorf("off %+v", off)
	}
	if l := (Config{MinRateWindow: -1}).limits(); l.rateWindow != 0 {
		t.Errorf("MinRateWindow off leaves MinRate on: %+v", l)
	}
	if l := (Config{MinRate: 3, MinRateWindow: 1500 * time.Millisecond}).limits(); l.rateWindow != 1500*time.Millisecond || l.rateBytes != 5 {
		t.Errorf("MinRate 3 B/s over 1.5s: window %v, %d bytes; want 1.5s, 5 (rounded up)", l.rateWindow, l.rateBytes)
	}
	if b, ok := (Config{}).CloseBound(); !ok || b != 2*DefaultWriteTimeout+DefaultIdleTimeout+DefaultLingerTime {
		t.Errorf("CloseBound %v %v", b, ok)
	}
	if _, ok := (Config{IdleTimeout: -1}).CloseBound(); ok {
		t.Error("CloseBound claims a bound with IdleTimeout off")
	}
}

func TestNamesAreComplete(t *testing.T) {
	for r := ReasonNone; r <= ReasonMinRate; r++ {
		if strings.HasPrefix(r.String(), "Reason(") {
			t.Errorf("reason %d has no name", r)
		}
	}
	for l := LingerEndNone; l <= LingerEndBytes; l++ {
		if strings.HasPrefix(l.String(), "LingerEnd(") {
			t.Errorf("linger %d has no name", l)
		}
	}
	for o := OpStart; o <= OpDone; o++ {
		if o.String() == "" || o.String() == "Op(?)" {
			t.Errorf("op %d has no name", o)
		}
	}
}

// TestOnCloseHookReportsTheReason: the reason of an abort reaches the
// Config.OnClose hook as well as the handler, once, the handler first.
func TestOnCloseHookReportsTheReason(t *testing.T) {
	var order []string
	var hooked []CloseInfo
	cfg := testCfg
	cfg.OnClose = func(c ConnInfo, info CloseInfo) {
		order = append(order, "hook")
		hooked = append(hooked, info)
		if c.ID != 7 {
			t.Errorf("hook got conn %d", c.ID)
		}
	}
	h := &testHandler{onData: func(c *Conn, _ []byte) { c.Abort(errors.New("policy")) }}
	e := newTestEngine(t, cfg, h)
	e.Start(t0)
	e.ReadDone(t0, []byte("x"), ResultOK, nil)
	expect(t, e, t0, OpAbort, "", time.Time{})
	e.CloseDone(t0)
	e.CloseDone(t0)
	order = append([]string{h.calls[len(h.calls)-1]}, order...)
	if len(hooked) != 1 || hooked[0].Reason != ReasonHandlerAbort || !errors.Is(hooked[0].Err, ErrAborted) || hooked[0] != h.infos[0] {
		t.Fatalf("hook got %+v; handler got %+v", hooked, h.infos)
	}
	if strings.Join(order, ",") != "close,hook" {
		t.Fatalf("order %v", order)
	}
}

// TestDebugLevelFollowsLevelVar: the engine asks the logger's level anew at
// every step (beginStep), so a level changed at run time through a
// slog.LevelVar takes effect at the connection's next step, in both
// directions, for the transitions and for the close.
func TestDebugLevelFollowsLevelVar(t *testing.T) {
	var out strings.Builder
	var lv slog.LevelVar // Info
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: &lv}))
	e, now := newEchoEngine(t, log, 7)
	exchange := func() string {
		t.Helper()
		out.Reset()
		if !echoExchange(e, now) {
			t.Fatalf("no echo: state %v", e.State())
		}
		return out.String()
	}
	if got := exchange(); got != "" {
		t.Errorf("at Info, an exchange logged:\n%s", got)
	}
	lv.Set(slog.LevelDebug)
	got := exchange()
	for _, want := range []string{"from=receiving to=sending", "from=sending to=receiving"} {
		if !strings.Contains(got, "state change") || !strings.Contains(got, want) {
			t.Errorf("at Debug, the exchange's log lacks %q:\n%s", want, got)
		}
	}
	lv.Set(slog.LevelInfo)
	if got := exchange(); got != "" {
		t.Errorf("back at Info, an exchange logged:\n%s", got)
	}
	lv.Set(slog.LevelDebug)
	out.Reset()
	e.ReadDone(now, nil, ResultEOF, io.EOF)
	for a := e.Next(now); a.Op != OpDone; a = e.Next(now) {
		switch a.Op {
		case OpCloseWrite:
			e.CloseWriteDone(now, ResultOK, nil)
		case OpClose:
			e.CloseDone(now)
		default:
			t.Fatalf("closing: engine asked for %v", a.Op)
		}
	}
	if got := out.String(); !strings.Contains(got, "connection closed") || !strings.Contains(got, "conn=7") {
		t.Errorf("at Debug, the graceful close's log lacks \"connection closed\" tagged conn=7:\n%s", got)
	}
}
