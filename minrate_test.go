package sockfsm

// Config.MinRate on the engine, on a virtual clock: a peer that trickles is
// closed gracefully at the end of the window its first byte began; a peer
// that sends enough, a silent peer, and time spent sending, paused or after
// the peer's FIN are not judged.

import (
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// rateCfg: 10 B/s over 2s windows (20 bytes a window); IdleTimeout 10s.
var rateCfg = func() Config {
	c := testCfg
	c.MinRate, c.MinRateWindow = 10, 2*time.Second
	return c
}()

// sink is a handler that answers nothing.
func sink(t *testing.T) (*Engine, *testHandler) {
	e, h := receiving(t, rateCfg)
	h.onData = func(*Conn, []byte) {}
	return e, h
}

// TestMinRateTrickleCloses: a byte every half second (2 B/s, under 10 B/s)
// half-closes the connection at the end of the window its first byte
// began, gracefully, with ReasonMinRate; the read's deadline is that end.
func TestMinRateTrickleCloses(t *testing.T) {
	e, _ := sink(t)
	first := t0.Add(time.Second)
	end := first.Add(rateCfg.MinRateWindow)
	for i := range 4 {
		at := first.Add(time.Duration(i) * 500 * time.Millisecond)
		e.ReadDone(at, []byte("x"), ResultOK, nil)
		expect(t, e, at, OpRead, "", end) // the idle deadline (at+10s) is later
	}
	expect(t, e, end.Add(-time.Nanosecond), OpRead, "", end)
	expect(t, e, end, OpCloseWrite, "", time.Time{})
	info := e.CloseInfo()
	if info.Reason != ReasonMinRate || info.Aborted() || info.BytesRead != 4 {
		t.Fatalf("CloseInfo %+v; want min-rate, graceful, 4 bytes read", info)
	}
	if got := info.Reason.String(); got != "min-rate" {
		t.Fatalf("ReasonMinRate.String() = %q", got)
	}
}

// TestMinRateEnoughPasses: a window that brings MinRate×MinRateWindow bytes
// passes; the next window starts at the next input, not before: silence
// after it is IdleTimeout's business.
func TestMinRateEnoughPasses(t *testing.T) {
	e, _ := sink(t)
	e.ReadDone(t0, make([]byte, 15), ResultOK, nil)
	e.ReadDone(t0.Add(time.Second), make([]byte, 5), ResultOK, nil) // 20 bytes: enough
	idle := t0.Add(time.Second + rateCfg.IdleTimeout)
	expect(t, e, t0.Add(time.Second), OpRead, "", t0.Add(rateCfg.MinRateWindow))
	// The window ends: it passes, and no window runs until more input.
	expect(t, e, t0.Add(rateCfg.MinRateWindow), OpRead, "", idle)
	// A new window from the next byte, judged on its own.
	at := t0.Add(5 * time.Second)
	e.ReadDone(at, []byte("y"), ResultOK, nil)
	expect(t, e, at, OpRead, "", at.Add(rateCfg.MinRateWindow))
	expect(t, e, at.Add(rateCfg.MinRateWindow), OpCloseWrite, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonMinRate {
		t.Fatalf("reason %s, want min-rate", r)
	}
}

// TestMinRateSilenceIsIdle: a connection that receives nothing starts no
// window: it is closed by IdleTimeout, never by MinRate.
func TestMinRateSilenceIsIdle(t *testing.T) {
	e, _ := sink(t)
	expect(t, e, t0.Add(rateCfg.MinRateWindow), OpRead, "", t0.Add(rateCfg.IdleTimeout))
	expect(t, e, t0.Add(rateCfg.IdleTimeout), OpCloseWrite, "", time.Time{})
	if r := e.CloseInfo().Reason; r != ReasonIdleTimeout {
		t.Fatalf("reason %s, want idle-timeout", r)
	}
}

// TestMinRateAnswerRestarts: output ends the window (time in Sending does
// not count): an echo peer that sends a byte a second is answered each
// time and never closed by MinRate.
func TestMinRateAnswerRestarts(t *testing.T) {
	e, _ := receiving(t, rateCfg) // echo
	for i := range 6 {
		at := t0.Add(time.Duration(i) * time.Second)
		e.ReadDone(at, []byte("z"), ResultOK, nil)
		a := expect(t, e, at, OpWrite, "z", at.Add(rateCfg.WriteTimeout))
		e.WriteDone(at, len(a.Data), ResultOK, nil)
		expect(t, e, at, OpRead, "", at.Add(rateCfg.IdleTimeout))
	}
	expectState(t, e, fsm.Receiving)
}

// TestMinRatePauseRestarts: a pause ends the window; after ResumeRead the
// next input starts a new one.
func TestMinRatePauseRestarts(t *testing.T) {
	e, _ := sink(t)
	e.ReadDone(t0, []byte("a"), ResultOK, nil)
	e.Conn().PauseRead()
	expect(t, e, t0.Add(5*time.Second), OpWait, "", time.Time{})
	e.Conn().ResumeRead()
	at := t0.Add(6 * time.Second)
	expect(t, e, at, OpRead, "", at.Add(rateCfg.IdleTimeout))
	e.ReadDone(at, []byte("b"), ResultOK, nil)
	expect(t, e, at, OpRead, "", at.Add(rateCfg.MinRateWindow))
}

// TestMinRatePeerFINEnds: after the peer's FIN nothing is judged: a held
// connection (the net.Conn face) that read a trickle and then the FIN is
// not closed by MinRate.
func TestMinRatePeerFINEnds(t *testing.T) {
	h := &testHandler{onData: func(*Conn, []byte) {}, onOpen: func(c *Conn) { c.Hold() }}
	e := newTestEngine(t, rateCfg, h)
	e.Start(t0)
	e.ReadDone(t0, []byte("a"), ResultEOF, nil)
	// Past the window, before IdleTimeout (which still runs).
	expect(t, e, t0.Add(5*time.Second), OpWait, "", t0.Add(rateCfg.IdleTimeout))
	expectState(t, e, fsm.Receiving)
}

// TestMinRateOff: MinRate or MinRateWindow negative: a trickle is never
// judged.
func TestMinRateOff(t *testing.T) {
	for _, cfg := range []Config{{MinRate: -1}, {MinRateWindow: -1}} {
		cfg.IdleTimeout, cfg.Logger = time.Minute, testCfg.Logger
		e, h := receiving(t, cfg)
		h.onData = func(*Conn, []byte) {}
		for i := range 100 {
			at := t0.Add(time.Duration(i) * 10 * time.Second)
			e.ReadDone(at, []byte("x"), ResultOK, nil)
			expect(t, e, at, OpRead, "", at.Add(time.Minute))
		}
	}
}

// TestMinRateReasonIsGraceful: ReasonMinRate closes gracefully, though it
// comes after the abortive reasons.
func TestMinRateReasonIsGraceful(t *testing.T) {
	if ReasonMinRate.Abortive() || !ReasonInternal.Abortive() || (CloseInfo{Reason: ReasonMinRate}).Aborted() {
		t.Fatal("ReasonMinRate is abortive, or ReasonInternal is not")
	}
}
