package sockfsm

// Property tests of the engine's promises. Each case runs the real driver
// loop over a simulated peer (transport/sim) on a virtual clock: every delay,
// chunk size and fault is drawn by rapid, so a failure shrinks to a small
// history and replays from its seed (go test -run NAME -rapid.seed=N). No
// case sleeps; thousands run in seconds.

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/transport/sim"
)

// drawer makes the simulated peer's, the handler's and the server's choices
// with rapid. rapid stops a case by panicking (an exhausted replay, a
// Fatalf); the engine would take such a panic inside a handler for the
// handler's own and swallow it, so drawer catches it, aborts the
// connection, and run raises it again once the driver has returned.
type drawer struct {
	t *rapid.T
	w *world
}

func (d drawer) Intn(label string, n int) int { return d.draw(label, 0, n-1) }

func (d drawer) draw(label string, lo, hi int) (v int) {
	if d.w.panicked != nil {
		return lo
	}
	defer func() {
		if r := recover(); r != nil {
			d.w.panicked = r
			d.w.d.e.Abort(errRapidStopped)
			v = lo
		}
	}()
	return rapid.IntRange(lo, hi).Draw(d.t, label)
}

func (d drawer) fatalf(format string, args ...any) {
	if d.w.panicked == nil {
		d.w.panicked = fmt.Sprintf(format, args...)
		d.w.d.e.Abort(errRapidStopped)
	}
}

// edge is one transition reported by OnStateChange.
type edge struct {
	from, to fsm.State
	ev       fsm.Event
}

// recorder is a handler that does what rapid draws and records what it did
// and what it heard.
type recorder struct {
	d      drawer
	random bool // draw actions; otherwise echo
	sink   bool // answer nothing (when not random)
	clock  *sim.Clock
	first  time.Time // the first OnData

	wrote       []byte // bytes Write accepted: what the peer is owed
	shutdownAsk bool   // the handler asked for CloseWrite, Close or Abort
	aborted     bool
	badWrites   []error // Writes after shutdown that did not fail with ErrShutdown
	events      []string
	closes      int
	afterClose  []string // callbacks after OnClose
	info        CloseInfo
}

func (r *recorder) note(ev string) {
	if r.closes > 0 {
		r.afterClose = append(r.afterClose, ev)
	}
	r.events = append(r.events, ev)
}

func (r *recorder) write(c *Conn, p []byte) {
	n, err := c.Write(p)
	if st := c.State(); r.shutdownAsk || (st != fsm.Accepted && st != fsm.Receiving && st != fsm.Sending) {
		if n != 0 || !errors.Is(err, ErrShutdown) {
			r.badWrites = append(r.badWrites, fmt.Errorf("write after shutdown in %s: n=%d err=%v", c.State(), n, err))
		}
		return
	}
	r.wrote = append(r.wrote, p[:n]...)
}

func (r *recorder) act(c *Conn, p []byte) {
	if r.first.IsZero() {
		r.first = r.clock.Now()
	}
	if r.sink && !r.random {
		return
	}
	if !r.random {
		r.write(c, p)
		return
	}
	// rapid draws the ends of a range most often: the common, benign
	// action (echo) takes them, and the disruptive ones are rare values
	// in the middle.
	switch r.d.draw("handler", 0, 99) {
	default:
		r.write(c, p)
	case 40, 41, 42:
		// Write nothing.
	case 43, 44:
		r.write(c, bytes.Repeat([]byte{'x'}, r.d.draw("extra", 1, 300)))
	case 45:
		r.shutdownAsk = true
		c.CloseWrite()
		r.write(c, []byte("late")) // must be refused
	case 46:
		r.shutdownAsk = true
		c.Close()
		r.write(c, []byte("late"))
	case 47:
		r.shutdownAsk, r.aborted = true, true
		c.Abort(nil)
		r.write(c, []byte("late"))
	}
}

func (r *recorder) OnOpen(c *Conn) {
	r.note("open")
	if r.random && r.d.draw("greet", 0, 4) == 4 {
		r.write(c, []byte("hello\n"))
	}
}

func (r *recorder) OnData(c *Conn, p []byte) {
	r.note("data")
	r.act(c, p)
}

func (r *recorder) OnPeerClose(c *Conn) {
	r.note("peer-close")
	if r.random && r.d.draw("goodbye", 0, 2) == 2 {
		r.write(c, []byte("bye\n"))
	}
}

func (r *recorder) OnClose(c *Conn, info CloseInfo) {
	r.note("close")
	r.closes++
	r.info = info
}

// world is one simulated connection, run to the end.
type world struct {
	cfg    Config
	lim    limits
	clock  *sim.Clock
	conn   *sim.Socket
	d      *driver
	h      *recorder
	edges  []edge
	start  time.Time
	result CloseInfo
	// panicked is a rapid panic caught during the run, raised again after.
	panicked any
	// hookCloses and hookInfo record Config.OnClose.
	hookCloses int
	hookInfo   CloseInfo
	// lastPush is when another goroutine last had output accepted or
	// resumed reading: activity, like the peer's input.
	lastPush time.Time
	paused   bool // "another goroutine" paused reading
	// early lists states reported before they were true of the socket.
	early []string
}

// push writes p from outside the handler's callbacks, as another goroutine
// would, and records what was accepted.
func (w *world) push(c *Conn, p []byte) {
	before := len(w.h.wrote)
	w.h.write(c, p)
	if len(w.h.wrote) > before {
		w.lastPush = w.clock.Now()
	}
}

// errRapidStopped aborts a connection whose case rapid stopped.
var errRapidStopped = errors.New("rapid stopped the case")

// maxOps bounds the driver's operations in one case: a livelock fails the
// case instead of hanging it.
const maxOps = 20000

// drawConfig draws timeouts in whole virtual seconds, sometimes off.
func drawConfig(t *rapid.T) Config {
	d := func(label string, lo, hi int, canBeOff bool) time.Duration {
		if canBeOff && rapid.IntRange(0, 4).Draw(t, label+"-off") == 0 {
			return -1
		}
		return time.Duration(rapid.IntRange(lo, hi).Draw(t, label)) * time.Second
	}
	return Config{
		Logger:           slog.New(discardHandler{}),
		IdleTimeout:      d("idle", 1, 20, false),
		WriteTimeout:     d("write", 1, 20, false),
		LingerTimeout:    d("linger-timeout", 1, 10, true),
		LingerTime:       d("linger-time", 1, 30, false),
		LingerBytes:      int64(rapid.IntRange(-1, 2000).Draw(t, "linger-bytes")),
		MaxLifetime:      d("lifetime", 1, 60, true) * time.Duration(rapid.IntRange(0, 1).Draw(t, "lifetime-on")),
		MinRate:          int64(rapid.IntRange(-1, 200).Draw(t, "min-rate")),
		MinRateWindow:    d("min-rate-window", 1, 20, true),
		ReadBufferSize:   rapid.IntRange(1, 64).Draw(t, "read-buffer"),
		MaxPendingOutput: rapid.IntRange(1, 1024).Draw(t, "max-output"),
	}
}

// drawPeer draws a peer; faulty peers misbehave in every way the simulation
// knows.
func drawPeer(t *rapid.T, faults bool) sim.Peer {
	// The input's length is drawn (rapid keeps drawn slices short); its
	// content is a pattern that does not repeat within 251 bytes, so a
	// reordering or a gap shows.
	input := make([]byte, rapid.IntRange(0, 2000).Draw(t, "input-len"))
	seed := rapid.Byte().Draw(t, "input-seed")
	for i := range input {
		input[i] = seed + byte(i%251)
	}
	return sim.Peer{
		Input:    input,
		MaxChunk: rapid.IntRange(1, 100).Draw(t, "chunk"),
		MaxDelay: time.Duration(rapid.IntRange(1, 3000).Draw(t, "max-delay-ms")) * time.Millisecond,
		Window:   rapid.IntRange(1, 512).Draw(t, "window"),
		FIN:      !faults || rapid.Bool().Draw(t, "fin"),
		Faults:   faults,
	}
}

// run runs one connection to the end. If control is set, the server may
// shut down or abort the connection at any of the peer's moves.
func run(t *rapid.T, cfg Config, peer sim.Peer, random, control bool) *world {
	return runHandler(t, cfg, peer, &recorder{random: random}, control)
}

// runHandler is run with the recorder h (its drawer and clock are set
// here).
func runHandler(t *rapid.T, cfg Config, peer sim.Peer, h *recorder, control bool) *world {
	if err := cfg.Validate(); err != nil {
		t.Fatalf("drew an invalid config: %v", err)
	}
	w := &world{cfg: cfg, lim: cfg.limits()}
	dr := drawer{t: t, w: w}
	w.h = h
	h.d = dr
	w.start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	w.clock = sim.NewClock(w.start)
	h.clock = w.clock
	w.conn = sim.NewSocket(w.clock, dr, peer)
	cfg.OnStateChange = func(_ ConnInfo, from, to fsm.State, ev fsm.Event) {
		w.edges = append(w.edges, edge{from, to, ev})
		// A state is entered when it is true of the socket.
		if to == fsm.HalfClosed && from != fsm.HalfClosed && w.conn.Rec.CloseWrites != 1 {
			w.early = append(w.early, fmt.Sprintf("half-closed entered after %d CloseWrite calls", w.conn.Rec.CloseWrites))
		}
		if to == fsm.Closed && w.conn.Rec.Closes != 1 {
			w.early = append(w.early, fmt.Sprintf("closed entered after %d Close calls", w.conn.Rec.Closes))
		}
	}
	cfg.OnClose = func(_ ConnInfo, info CloseInfo) {
		w.hookCloses++
		w.hookInfo = info
	}
	cfg.Logger = slog.New(discardHandler{})
	w.d = &driver{}
	w.d.init(w.conn, w.lim, w.h, ConnInfo{ID: 1}, &cfg, w.clock.Now)
	w.conn.Hook = func() {
		if w.conn.Rec.Ops > maxOps {
			dr.fatalf("livelock: more than %d operations", maxOps)
		}
		if !control {
			return
		}
		// A paused connection is resumed at the latest when its driver
		// waits: one that is never resumed is held, as PauseRead says.
		if w.paused && (w.conn.Waiting() || dr.draw("resume", 0, 1) == 0) {
			w.paused = false
			w.lastPush = w.clock.Now()
			w.d.e.Conn().ResumeRead()
		}
		// The server, and other goroutines acting on the connection
		// while its driver is blocked in an operation: the hook runs
		// inside the transport's Read, Write and Wait.
		c := w.d.e.Conn()
		switch dr.draw("server", 0, 200) {
		case 101:
			w.d.e.Close()
		case 102:
			w.d.e.Abort(ErrShutdownDeadline)
		case 103, 104, 105:
			w.push(c, bytes.Repeat([]byte{'p'}, dr.draw("push", 1, 200)))
		case 106:
			w.h.shutdownAsk = true
			c.CloseWrite()
			w.push(c, []byte("late"))
		case 107:
			w.h.shutdownAsk = true
			c.Close()
		case 108:
			w.h.shutdownAsk, w.h.aborted = true, true
			c.Abort(nil)
		case 109:
			c.Do(func(c *Conn) { w.push(c, []byte("task")) })
		case 110:
			w.paused = true
			c.PauseRead()
		}
	}
	w.d.run()
	w.result = w.d.result
	if w.panicked != nil {
		panic(w.panicked)
	}
	return w
}

// checkCommon asserts what must hold for every connection, whatever the
// peer, the handler and the server did.
func checkCommon(t *rapid.T, w *world) {
	rec := w.conn.Rec
	// No send after shutdown.
	if rec.WritesAfterShutdown != 0 {
		t.Fatalf("%d writes reached the transport after our half-close or close", rec.WritesAfterShutdown)
	}
	for _, err := range w.h.badWrites {
		t.Fatalf("handler write not refused: %v", err)
	}
	// Closed, exactly once, handler told once and last.
	if w.d.e.State() != fsm.Closed {
		t.Fatalf("run returned in state %s: %+v", w.d.e.State(), w.result)
	}
	if rec.Closes != 1 {
		t.Fatalf("transport closed %d times, want 1", rec.Closes)
	}
	if rec.CloseWrites > 1 {
		t.Fatalf("CloseWrite called %d times", rec.CloseWrites)
	}
	if w.h.closes != 1 || len(w.h.afterClose) != 0 {
		t.Fatalf("OnClose called %d times; callbacks after it: %v", w.h.closes, w.h.afterClose)
	}
	if rec.Stuck {
		t.Fatal("the engine blocked with no deadline")
	}
	if w.result.Reason == ReasonInternal {
		t.Fatalf("engine bug: %v", w.result.Err)
	}
	if (rec.Aborts == 1) != w.result.Aborted() {
		t.Fatalf("Abort called %d times but the reason is %s", rec.Aborts, w.result.Reason)
	}
	if w.result != w.h.info {
		t.Fatalf("OnClose got %+v, run returned %+v", w.h.info, w.result)
	}
	if w.hookCloses != 1 || w.hookInfo != w.result {
		t.Fatalf("Config.OnClose called %d times with %+v; run returned %+v", w.hookCloses, w.hookInfo, w.result)
	}
	// Only table edges, in sequence, from Accepted to Closed, and the
	// looplab reference accepts each one; each state reported once it
	// was true of the socket.
	checkEdges(t, w.edges)
	for _, e := range w.early {
		t.Fatalf("a state reported early: %s", e)
	}
	// The linger reads at most LingerBytes (and the one read that
	// crosses it).
	if lb := w.lim.lingerBytes; lb > 0 && int64(rec.ReadAfterFIN) > lb+int64(w.lim.readBuf) {
		t.Fatalf("read %d bytes after our FIN; LingerBytes is %d", rec.ReadAfterFIN, lb)
	}
	// Output: a prefix of what the handler wrote reached the peer, in order.
	got := append(append([]byte{}, rec.Received...), rec.Lost...)
	got = append(got, w.conn.Pending()...)
	if !bytes.HasPrefix(w.h.wrote, got) {
		t.Fatalf("the peer got %q, not a prefix of what the handler wrote %q", got, w.h.wrote)
	}
	// No RST of ours over unread input, except when aborting or when the
	// peer kept sending past the linger bounds.
	if rec.ClosedWithUnread && !w.result.Aborted() && w.result.Linger != LingerEndTime && w.result.Linger != LingerEndBytes {
		t.Fatalf("closed with unread input (kernel RST) on a graceful path: %+v", w.result)
	}
	// The bound the docs promise.
	checkBound(t, w)
}

func checkEdges(t *rapid.T, edges []edge) {
	ref := fsm.NewReference()
	prev := fsm.Accepted
	for i, e := range edges {
		if e.from != prev {
			t.Fatalf("edge %d starts in %s, the machine was in %s", i, e.from, prev)
		}
		if to, ok := fsm.Lookup(e.from, e.ev); !ok || to != e.to {
			t.Fatalf("edge %d %s --%s--> %s is not in the table", i, e.from, e.ev, e.to)
		}
		if err := fsm.Step(ref, e.ev); err != nil {
			t.Fatalf("looplab refuses edge %d %s --%s-->: %v", i, e.from, e.ev, err)
		}
		if ref.Current() != e.to.String() {
			t.Fatalf("looplab went to %s, the engine to %s", ref.Current(), e.to)
		}
		prev = e.to
	}
	if prev != fsm.Closed {
		t.Fatalf("edges end in %s", prev)
	}
}

// checkBound asserts the connection closed within the bounds computed from
// the configuration: Config.CloseBound after the last activity (the peer's
// last input, a push or resume from another goroutine), and
// Config.LifetimeBound after the start.
func checkBound(t *rapid.T, w *world) {
	closedAt := w.conn.Rec.ClosedAt
	last := w.start
	if w.lastPush.After(last) {
		last = w.lastPush
	}
	if w.conn.Rec.LastInput.After(last) {
		last = w.conn.Rec.LastInput
	}
	if b, ok := w.cfg.CloseBound(); ok && closedAt.Sub(last) > b {
		t.Fatalf("closed %v after the last input; the bound is %v (%+v)", closedAt.Sub(last), b, w.result)
	}
	if b, ok := w.cfg.LifetimeBound(); ok && closedAt.Sub(w.start) > b {
		t.Fatalf("closed %v after the start; MaxLifetime bound is %v", closedAt.Sub(w.start), b)
	}
}

// TestPropertyNoSendAfterShutdown: after our half-close (or close) no Write
// reaches the transport, and every handler Write after it fails with
// ErrShutdown, whatever the peer, the handler and the server do.
func TestPropertyNoSendAfterShutdown(t *testing.T) { rapid.Check(t, propNoSendAfterShutdown) }

func propNoSendAfterShutdown(t *rapid.T) {
	w := run(t, drawConfig(t), drawPeer(t, rapid.Bool().Draw(t, "faults")), true, true)
	checkCommon(t, w)
}

// TestPropertyEveryConnectionClosed: every connection reaches Closed, its
// transport closed exactly once and its handler told once, within the
// configured bounds, whatever the peer does, including nothing at all.
func TestPropertyEveryConnectionClosed(t *testing.T) { rapid.Check(t, propEveryConnectionClosed) }

func propEveryConnectionClosed(t *rapid.T) {
	peer := drawPeer(t, true)
	w := run(t, drawConfig(t), peer, rapid.Bool().Draw(t, "random-handler"), rapid.Bool().Draw(t, "control"))
	checkCommon(t, w)
}

// TestPropertyEchoIsExact: with a peer that sends, half-closes and reads
// everything, the echo handler's output arrives exactly, in order, followed
// by our FIN and no RST. With random server shutdowns and handler closes,
// the peer still gets exactly what the handler wrote before the half-close.
func TestPropertyEchoIsExact(t *testing.T) { rapid.Check(t, propEchoIsExact) }

func propEchoIsExact(t *rapid.T) {
	{
		cfg := Config{ // long bounds: a well-behaved peer never hits them
			IdleTimeout: time.Hour, WriteTimeout: time.Hour, LingerTimeout: time.Hour, LingerTime: time.Hour,
			LingerBytes: -1, MinRate: -1, ReadBufferSize: rapid.IntRange(1, 64).Draw(t, "read-buffer"),
		}
		peer := drawPeer(t, false)
		random := rapid.Bool().Draw(t, "random-handler")
		control := rapid.Bool().Draw(t, "control")
		w := run(t, cfg, peer, random, control)
		checkCommon(t, w)
		rec := w.conn.Rec
		if w.result.Aborted() {
			if !w.h.aborted && w.result.Reason != ReasonShutdownDeadline {
				t.Fatalf("a well-behaved peer was aborted: %+v", w.result)
			}
			return
		}
		if !bytes.Equal(rec.Received, w.h.wrote) {
			t.Fatalf("the peer received %q, the handler wrote %q", rec.Received, w.h.wrote)
		}
		if !rec.GotFIN || rec.GotRST || rec.ClosedWithUnread || len(rec.Lost) > 0 {
			t.Fatalf("FIN=%v RST=%v unread=%v lost=%d", rec.GotFIN, rec.GotRST, rec.ClosedWithUnread, len(rec.Lost))
		}
		if !random && !control {
			if !bytes.Equal(rec.Received, peer.Input) || w.result.Reason != ReasonPeerClosed {
				t.Fatalf("echo: sent %q, received %q, reason %s", peer.Input, rec.Received, w.result.Reason)
			}
		}
	}
}

// TestPropertyOnlyTableEdges: every transition the engine takes is an edge
// of the table, taken from the state the machine was in, and the looplab
// reference machine accepts the same sequence.
func TestPropertyOnlyTableEdges(t *testing.T) { rapid.Check(t, propOnlyTableEdges) }

func propOnlyTableEdges(t *rapid.T) {
	w := run(t, drawConfig(t), drawPeer(t, rapid.Bool().Draw(t, "faults")), true, true)
	checkEdges(t, w.edges)
	if w.result.Reason == ReasonInternal {
		t.Fatalf("the engine attempted an illegal transition: %v", w.result.Err)
	}
}

// TestPropertyMinRate: with MinRate on and a handler that answers nothing,
// a peer whose whole input is less than one window needs (a trickler, at
// any pace) is closed within MinRateWindow + LingerTime of its first byte,
// with ReasonMinRate unless its FIN or the idle timeout came first; and a
// peer that sends at least a byte per MaxDelay, at MinRate ≤ 1/MaxDelay,
// then its FIN, is never closed by MinRate, however long its input.
func TestPropertyMinRate(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		window := time.Duration(rapid.IntRange(1, 10).Draw(t, "window")) * time.Second
		base := Config{
			WriteTimeout: 10 * time.Second, LingerTimeout: -1,
			LingerTime:     time.Duration(rapid.IntRange(1, 30).Draw(t, "linger-time")) * time.Second,
			ReadBufferSize: rapid.IntRange(1, 64).Draw(t, "read-buffer"),
			MinRateWindow:  window,
		}
		if rapid.Bool().Draw(t, "trickler") {
			cfg := base
			cfg.MinRate = int64(rapid.IntRange(2, 50).Draw(t, "rate"))
			cfg.IdleTimeout = time.Duration(rapid.IntRange(1, 30).Draw(t, "idle")) * time.Second
			need := cfg.MinRate * int64(window/time.Second)
			peer := drawPeer(t, false)
			peer.Input = peer.Input[:min(len(peer.Input), int(need-1))]
			peer.FIN = rapid.Bool().Draw(t, "fin")
			w := runHandler(t, cfg, peer, &recorder{sink: true}, false)
			checkCommon(t, w)
			if w.h.first.IsZero() {
				return // no input: IdleTimeout's business
			}
			if d := w.conn.Rec.ClosedAt.Sub(w.h.first); d > window+cfg.LingerTime {
				t.Fatalf("closed %v after the first byte; MinRateWindow + LingerTime is %v (%+v)", d, window+cfg.LingerTime, w.result)
			}
			if !peer.FIN && cfg.IdleTimeout > window && w.result.Reason != ReasonMinRate {
				t.Fatalf("a trickler of %d bytes (a window needs %d) closed with %s, want %s", len(peer.Input), need, w.result.Reason, ReasonMinRate)
			}
			return
		}
		delayMs := rapid.IntRange(1, 1000).Draw(t, "max-delay-ms")
		cfg := base
		cfg.MinRate = int64(max(1, 1000/delayMs))
		cfg.IdleTimeout = time.Hour
		peer := drawPeer(t, false)
		peer.MaxDelay = time.Duration(delayMs) * time.Millisecond
		peer.FIN = true
		w := runHandler(t, cfg, peer, &recorder{sink: true}, false)
		checkCommon(t, w)
		if w.result.Reason != ReasonPeerClosed || w.result.BytesRead != int64(len(peer.Input)) {
			t.Fatalf("a peer sending a byte per %v at least, MinRate %d B/s: %+v; want %s after all %d bytes",
				peer.MaxDelay, cfg.MinRate, w.result, ReasonPeerClosed, len(peer.Input))
		}
	})
}
