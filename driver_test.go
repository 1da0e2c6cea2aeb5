package sockfsm

// Tests of the driver loop against a scripted transport: the interleavings
// of requests from other goroutines with the loop's own calls.

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// scripted is a transport whose reads a test scripts. When the script is
// exhausted, reads return the peer's FIN.
type scripted struct {
	t        *testing.T
	reads    []scriptedRead
	written  bytes.Buffer
	onSetRDL func(time.Time)
	onRead   func()
	fin      bool
	closes   int
	clock    *time.Time // if set, write deadlines are enforced against it
	wdl      time.Time
}

type scriptedRead struct {
	data string
	err  error
}

func (s *scripted) Read(p []byte) (int, error) {
	if s.onRead != nil {
		s.onRead()
	}
	if len(s.reads) == 0 {
		return 0, io.EOF
	}
	r := s.reads[0]
	s.reads = s.reads[1:]
	return copy(p, r.data), r.err
}

func (s *scripted) Write(p []byte) (int, error) {
	if s.clock != nil && !s.wdl.IsZero() && !s.clock.Before(s.wdl) {
		return 0, os.ErrDeadlineExceeded
	}
	if s.fin {
		s.t.Errorf("write after CloseWrite: %q", p)
	}
	return s.written.Write(p)
}

func (s *scripted) CloseWrite() error { s.fin = true; return nil }
func (s *scripted) Close() error      { s.closes++; return nil }
func (s *scripted) Abort() error      { s.closes++; return nil }
func (s *scripted) SetReadDeadline(t time.Time) error {
	if s.onSetRDL != nil {
		s.onSetRDL(t)
	}
	return nil
}
func (s *scripted) SetWriteDeadline(t time.Time) error { s.wdl = t; return nil }
func (s *scripted) LocalAddr() net.Addr                { return nil }
func (s *scripted) RemoteAddr() net.Addr               { return nil }

func newScriptedDriver(tr *scripted, cfg Config) *driver {
	d := &driver{}
	d.init(tr, cfg.limits(), Echo{}, ConnInfo{ID: 1}, &cfg, time.Now)
	return d
}

var hourCfg = Config{IdleTimeout: time.Hour, LingerTimeout: time.Hour, LingerTime: time.Hour}

// TestDriverWakeRace: a shutdown requested after the loop set its read
// deadline but before it called Read (so the request's own wake-up, a past
// deadline, came before the loop's and was overwritten) must be seen before
// the loop blocks in Read. The connection is new, so the close, once
// seen, waits for its first input (FirstInputGrace), which it answers
// before our FIN.
func TestDriverWakeRace(t *testing.T) {
	tr := &scripted{t: t, reads: []scriptedRead{{data: "hi"}}}
	d := newScriptedDriver(tr, hourCfg)
	requested := false
	tr.onSetRDL = func(dl time.Time) {
		if dl.After(time.Now()) && !requested {
			requested = true
			d.e.Close() // from "another goroutine", between SetReadDeadline and Read
		}
	}
	blockedWithRequest := 0
	tr.onRead = func() {
		if d.e.Pending() {
			blockedWithRequest++
		}
	}
	d.run()
	info := d.result
	if blockedWithRequest != 0 {
		t.Fatalf("Read called %d times with a request pending: the loop would block until the idle timeout", blockedWithRequest)
	}
	if info.Reason != ReasonShutdown || !tr.fin || tr.closes != 1 {
		t.Fatalf("info %+v fin=%v closes=%d", info, tr.fin, tr.closes)
	}
}

// TestDriverDataWithEOFDuringShutdown: a request that arrives together with
// EOF (as TLS returns it when close_notify follows the data) while a
// shutdown is being requested still gets its answer.
func TestDriverDataWithEOFDuringShutdown(t *testing.T) {
	tr := &scripted{t: t, reads: []scriptedRead{{"request", io.EOF}}}
	d := newScriptedDriver(tr, hourCfg)
	tr.onRead = func() { d.e.Close() } // the request lands while Read returns
	d.run()
	info := d.result
	if got := tr.written.String(); got != "request" {
		t.Fatalf("the peer got %q, want the answer %q (info %+v)", got, "request", info)
	}
	if info.Aborted() || !tr.fin || tr.closes != 1 {
		t.Fatalf("info %+v fin=%v closes=%d", info, tr.fin, tr.closes)
	}
}

// slowHandler takes an hour (on the test's clock) in each callback before
// it writes.
type slowHandler struct{ clock *time.Time }

func (h slowHandler) slow(c *Conn, p string) {
	*h.clock = h.clock.Add(time.Hour)
	c.Write([]byte(p))
}
func (h slowHandler) OnOpen(c *Conn)               { h.slow(c, "hello ") }
func (h slowHandler) OnData(c *Conn, p []byte)     { h.slow(c, string(p)) }
func (h slowHandler) OnPeerClose(c *Conn)          { h.slow(c, " bye") }
func (h slowHandler) OnClose(c *Conn, _ CloseInfo) {}

// TestDriverHandlerTimeIsNotWriteTime: however long OnOpen, OnData and
// OnPeerClose take, their output gets the whole WriteTimeout to be flushed.
func TestDriverHandlerTimeIsNotWriteTime(t *testing.T) {
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tr := &scripted{t: t, clock: &clock, reads: []scriptedRead{{"data", nil}, {"", io.EOF}}}
	cfg := Config{IdleTimeout: 10 * time.Hour, WriteTimeout: time.Minute}
	d := &driver{}
	d.init(tr, cfg.limits(), slowHandler{&clock}, ConnInfo{ID: 1}, &cfg, func() time.Time { return clock })
	d.run()
	if got, want := tr.written.String(), "hello data bye"; got != want || d.result.Aborted() {
		t.Fatalf("the peer got %q, want %q; info %+v", got, want, d.result)
	}
}

// TestDriverPanicStillNotifiesOnce: a panic that escapes the engine (here
// from OnStateChange) aborts the connection, and the handler and
// Config.OnClose still hear of it exactly once; a panic in Config.OnClose
// itself changes nothing about how the connection ended.
func TestDriverPanicStillNotifiesOnce(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		panicOnChange, inHook bool
		want                  Reason
	}{
		{"state hook panics", true, false, ReasonHandlerPanic},
		{"close hook panics", false, true, ReasonPeerClosed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := &scripted{t: t, reads: []scriptedRead{{"x", io.EOF}}}
			hooks := 0
			var hooked CloseInfo
			cfg := Config{IdleTimeout: time.Hour}
			cfg.OnStateChange = func(_ ConnInfo, _, to fsm.State, _ fsm.Event) {
				if tc.panicOnChange && to == fsm.HalfClosed {
					panic("state hook")
				}
			}
			cfg.OnClose = func(_ ConnInfo, info CloseInfo) {
				hooks++
				hooked = info
				if tc.inHook {
					panic("close hook")
				}
			}
			h := &testHandler{}
			d := &driver{}
			d.init(tr, cfg.limits(), h, ConnInfo{ID: 1}, &cfg, time.Now)
			d.run()
			if hooks != 1 || len(h.infos) != 1 {
				t.Fatalf("Config.OnClose %d times, handler OnClose %d times; want 1 and 1", hooks, len(h.infos))
			}
			if d.result.Reason != tc.want || hooked.Reason != tc.want || tr.closes != 1 {
				t.Fatalf("result %s, hook %s, closes %d; want %s", d.result.Reason, hooked.Reason, tr.closes, tc.want)
			}
			if tc.want == ReasonHandlerPanic && !errors.Is(d.result.Err, ErrHandlerPanic) {
				t.Fatalf("err %v", d.result.Err)
			}
		})
	}
}

// handshaking is a scripted transport with a TLS-like handshake that
// counts its calls.
type handshaking struct {
	*scripted
	handshakes int
}

func (h *handshaking) Handshake() error { h.handshakes++; return nil }

// TestDriverHandshakeRunsWithARequestPending: output queued before the
// driver starts (a server that speaks first, right after Accept) does not
// skip the handshake, which the driver runs first, bounded by its own
// deadline, before the engine starts and the output is flushed.
func TestDriverHandshakeRunsWithARequestPending(t *testing.T) {
	tr := &handshaking{scripted: &scripted{t: t, reads: []scriptedRead{{"", io.EOF}}}}
	cfg := hourCfg
	d := &driver{}
	d.init(tr, cfg.limits(), Echo{}, ConnInfo{ID: 1}, &cfg, time.Now)
	if _, err := d.e.Conn().Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	d.run()
	if tr.handshakes != 1 || tr.written.String() != "hello" || d.result.Aborted() {
		t.Fatalf("handshakes %d, the peer got %q, info %+v; want 1 handshake, then the greeting", tr.handshakes, tr.written.String(), d.result)
	}
}
