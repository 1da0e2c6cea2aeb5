package sockfsm

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// Op is an I/O operation the engine asks its driver to perform.
type Op uint8

// The operations. After performing one, the driver reports its result with
// the matching method: ReadDone, WriteDone, CloseWriteDone or CloseDone.
const (
	// OpRead: read into a buffer of any size, with the read deadline
	// Action.Deadline (zero: none); report with ReadDone.
	OpRead Op = iota + 1
	// OpWrite: write Action.Data with the write deadline Action.Deadline;
	// report with WriteDone.
	OpWrite
	// OpCloseWrite: half-close the transport (CloseWrite); report with
	// CloseWriteDone.
	OpCloseWrite
	// OpClose: close the transport gracefully; report with CloseDone.
	OpClose
	// OpAbort: abort the transport (RST); report with CloseDone.
	OpAbort
	// OpDone: nothing more; the connection is closed and the handler told.
	OpDone
)

var opNames = [...]string{"", "read", "write", "close-write", "close", "abort", "done"}

// String returns the operation's name.
func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return "Op(?)"
}

// Action is the engine's next request to its driver.
type Action struct {
	Op       Op
	Data     []byte    // OpWrite: the bytes to write
	Deadline time.Time // OpRead, OpWrite: the deadline to set; zero means none
}

// closeKind is what closing the handler or the engine has asked for.
type closeKind uint8

const (
	closeNone closeKind = iota
	closeHalf           // our FIN; input still goes to the handler
	closeFull           // our FIN; input is discarded until the peer's FIN
)

// Engine is the lifecycle of one connection, with no I/O of its own, in the
// manner of etcd raft's RawNode: a driver asks it for the next operation
// (Next), performs it on a transport, and reports the result (ReadDone,
// WriteDone, CloseWriteDone, CloseDone). Every method takes the current
// time, so an Engine runs on a virtual clock as well as on the real one.
//
// ServeConn and Server are the engine's drivers; use Engine directly only
// to drive connections from an event loop of your own. An Engine is not safe
// for concurrent use.
type Engine struct {
	m    fsm.Machine
	conn Conn
	info ConnInfo
	lim  limits
	base *slog.Logger // the logger given; nil logs nothing
	log  *slog.Logger // base tagged with the connection; built on first use

	h        Handler
	hOpen    OpenHandler
	hPeer    PeerCloseHandler
	hClose   CloseHandler
	onChange func(ConnInfo, fsm.State, fsm.State, fsm.Event)
	onClose  func(ConnInfo, CloseInfo)

	now        time.Time // the time of the step in progress
	start      time.Time
	recvSince  time.Time // Receiving entered or input last read: idle base
	sendSince  time.Time // the flush began: write deadline base
	halfAt     time.Time // HalfClosed entered: LingerTime base
	lastLinger time.Time // last read while HalfClosed: LingerTimeout base

	out      []byte // queued output; out[outOff:] is not yet written
	outOff   int
	closeReq closeKind
	reason   Reason
	err      error
	linger   LingerEnd
	flushing bool // a flush is under way: sendSince is set
	finSent  bool
	// finWhileHalf: the peer's FIN arrived while we lingered.
	finWhileHalf bool
	closed       bool // the driver reported CloseDone
	notified     bool // OnClose was called
	debug        bool // the logger logs transitions: see debugEnabled

	bytesIn, bytesOut, discarded, lingerRead int64

	mut     mutation // test-only bugs; see mutate.go
	mutDone bool
}

// NewEngine returns an engine in Accepted for one connection. It returns an
// error matching ErrInvalidConfig if cfg is invalid. cfg.MaxConns is
// ignored.
func NewEngine(cfg Config, h Handler, info ConnInfo) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, ErrNoHandler
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	e := &Engine{}
	e.init(cfg.limits(), h, info, cfg.OnStateChange, log)
	e.onClose = cfg.OnClose
	return e, nil
}

func (e *Engine) init(lim limits, h Handler, info ConnInfo, onChange func(ConnInfo, fsm.State, fsm.State, fsm.Event), log *slog.Logger) {
	e.conn.e = e
	e.lim = lim
	e.h = h
	e.hOpen, _ = h.(OpenHandler)
	e.hPeer, _ = h.(PeerCloseHandler)
	e.hClose, _ = h.(CloseHandler)
	e.info = info
	e.onChange = onChange
	e.base = log
	e.debug = e.debugEnabled() // for transitions before the first Next: a failed handshake, say
}

// logger returns the connection's logger, tagged with its id and remote
// address; it is built on first use, so a connection that logs nothing
// pays nothing for it.
func (e *Engine) logger() *slog.Logger {
	if e.log == nil {
		if e.base == nil {
			e.base = slog.New(discardHandler{})
		}
		e.log = connLogger(e.base, e.info)
	}
	return e.log
}

// debugEnabled reports whether the logger logs at debug level. Next asks it
// once per operation, rather than fire once per transition: the logger's
// level can change at run time (slog.LevelVar), and the answer is then
// heeded from the next operation on.
//
//go:noinline
func (e *Engine) debugEnabled() bool {
	return e.base != nil && e.base.Enabled(context.Background(), slog.LevelDebug)
}

// discardHandler is a slog.Handler that drops everything.
type discardHandler struct{}

func (discardHandler) Enabled(context.Context, slog.Level) bool  { return false }
func (discardHandler) Handle(context.Context, slog.Record) error { return nil }
func (h discardHandler) WithAttrs([]slog.Attr) slog.Handler      { return h }
func (h discardHandler) WithGroup(string) slog.Handler           { return h }

// State returns the connection's lifecycle state.
func (e *Engine) State() fsm.State { return e.m.State() }

// Info identifies the connection.
func (e *Engine) Info() ConnInfo { return e.info }

// Conn returns the handler's view of the connection.
func (e *Engine) Conn() *Conn { return &e.conn }

// fire applies ev: the one place the state changes (smoltcp's set_state).
// An illegal event is an engine bug; the connection is aborted with
// ReasonInternal.
func (e *Engine) fire(ev fsm.Event) bool {
	from, err := e.m.Fire(ev)
	if err != nil {
		e.internal(err)
		return false
	}
	to := e.m.State()
	switch {
	case to == fsm.Receiving && (from != fsm.Receiving || ev == fsm.Input):
		e.recvSince = e.now
	case to == fsm.HalfClosed && from != fsm.HalfClosed:
		e.halfAt, e.lastLinger = e.now, e.now
	}
	if e.onChange != nil {
		e.notifyChange(from, to, ev)
	}
	if e.debug {
		e.logTransition(from, to, ev)
	}
	return true
}

// notifyChange calls Config.OnStateChange. It and logTransition are kept
// out of fire, whose frame is on the path from the handler's Write to the
// table: the deeper that path, the likelier a connection's goroutine grows
// its stack (TestIdleConnectionStack).
//
//go:noinline
func (e *Engine) notifyChange(from, to fsm.State, ev fsm.Event) {
	e.onChange(e.info, from, to, ev)
}

//go:noinline
func (e *Engine) logTransition(from, to fsm.State, ev fsm.Event) {
	e.logger().LogAttrs(context.Background(), slog.LevelDebug, "state change",
		slog.String("from", from.String()), slog.String("to", to.String()), slog.String("event", ev.String()))
}

func (e *Engine) internal(err error) {
	if e.m.State() == fsm.Closed {
		if e.err == nil {
			e.reason, e.err = ReasonInternal, err
		}
		return
	}
	e.reason, e.err = ReasonInternal, err
	e.dropOutput()
	e.fire(fsm.Abort) // legal from every state but Closed, so this cannot recurse
}

// abort closes the connection with RST; it does nothing once Closed.
func (e *Engine) abort(r Reason, err error) {
	if e.m.State() == fsm.Closed {
		return
	}
	e.reason, e.err = r, err
	e.dropOutput()
	e.fire(fsm.Abort)
}

// keepOutput is the largest output buffer kept between flushes; a larger
// one is released so that one large response does not pin its memory for
// the rest of the connection's life.
const keepOutput = 64 << 10

func (e *Engine) dropOutput() {
	if cap(e.out) > keepOutput {
		e.out = nil
	}
	e.out = e.out[:0]
	e.outOff = 0
	e.flushing = false
}

// requestClose asks for a graceful close of the given kind. A full close
// overrides a half-close; the first reason given is kept.
func (e *Engine) requestClose(k closeKind, r Reason) error {
	if e.m.State() == fsm.Closed {
		return nil
	}
	if k > e.closeReq {
		e.closeReq = k
	}
	if e.reason == ReasonNone {
		e.reason = r
	}
	return nil
}

func (e *Engine) write(p []byte) (int, error) {
	if e.closeReq != closeNone {
		return 0, ErrShutdown
	}
	switch e.m.State() {
	case fsm.Receiving, fsm.Sending:
	default:
		return 0, ErrShutdown
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := len(p), error(nil)
	if room := e.lim.maxOut - (len(e.out) - e.outOff); n > room {
		n, err = room, ErrOutputFull
	}
	if n <= 0 {
		return 0, ErrOutputFull
	}
	if !e.fire(fsm.Output) {
		return 0, ErrShutdown
	}
	e.out = append(e.out, p[:n]...)
	return n, err
}

// Start fires Start and calls the handler's OnOpen. Next calls it if the
// driver has not.
func (e *Engine) Start(now time.Time) {
	if e.m.State() != fsm.Accepted {
		return
	}
	e.now, e.start = now, now
	e.debug = e.debugEnabled()
	if e.fire(fsm.Start) && e.hOpen != nil {
		e.callOpen()
	}
}

// Next returns the operation the driver must perform next. Deadlines that
// have passed by now take effect first.
func (e *Engine) Next(now time.Time) Action {
	e.now = now
	e.debug = e.debugEnabled()
	for {
		switch e.m.State() {
		case fsm.Accepted:
			e.Start(now)
		case fsm.Receiving:
			if e.closeReq != closeNone {
				e.fire(fsm.HalfClose) // everything queued was flushed
				continue
			}
			dl := e.receiveDeadline()
			if !dl.IsZero() && !now.Before(dl) {
				e.receiveTimeout(now)
				continue
			}
			return Action{Op: OpRead, Deadline: dl}
		case fsm.Sending:
			if mutating && e.mut&mutSkipFlush != 0 && e.closeReq != closeNone {
				e.dropOutput()
				e.fire(fsm.Flushed)
				continue
			}
			if !e.flushing {
				// The deadline starts with the flush, so the time the
				// handler took to produce the output does not count.
				e.flushing, e.sendSince = true, now
			}
			dl := e.sendSince.Add(e.lim.write)
			if mutating && e.mut&mutNoWriteTimeout != 0 {
				return Action{Op: OpWrite, Data: e.out[e.outOff:]}
			}
			if !now.Before(dl) {
				e.abort(ReasonWriteTimeout, ErrWriteTimeout)
				continue
			}
			return Action{Op: OpWrite, Data: e.out[e.outOff:], Deadline: dl}
		case fsm.HalfClosed:
			if !e.finSent {
				return Action{Op: OpCloseWrite}
			}
			if mutating && e.mut&mutWriteAfterFIN != 0 && !e.mutDone {
				e.mutDone = true
				return Action{Op: OpWrite, Data: []byte("!")}
			}
			if mutating && e.mut&mutSkipLinger != 0 {
				e.fire(fsm.Close)
				continue
			}
			if e.m.PeerFIN() {
				if e.finWhileHalf {
					e.linger = LingerPeerFIN
				}
				e.fire(fsm.Close)
				continue
			}
			if e.lim.lingerBytes > 0 && e.lingerRead >= e.lim.lingerBytes {
				e.linger = LingerBytes
				e.fire(fsm.Close)
				continue
			}
			dl, end := e.lingerDeadline()
			if !dl.IsZero() && !now.Before(dl) {
				e.linger = end
				e.fire(fsm.Close)
				continue
			}
			return Action{Op: OpRead, Deadline: dl}
		case fsm.Closed:
			if e.closed {
				if mutating && e.mut&mutCloseTwice != 0 && !e.mutDone {
					e.mutDone, e.closed = true, false
					return Action{Op: OpClose}
				}
				return Action{Op: OpDone}
			}
			if e.reason.Abortive() {
				return Action{Op: OpAbort}
			}
			return Action{Op: OpClose}
		default:
			e.internal(&fsm.TransitionError{From: e.m.State()})
		}
	}
}

func (e *Engine) receiveDeadline() time.Time {
	var dl time.Time
	if e.lim.idle > 0 && !(mutating && e.mut&mutNoIdleTimeout != 0) {
		dl = e.recvSince.Add(e.lim.idle)
	}
	if e.lim.lifetime > 0 {
		if l := e.start.Add(e.lim.lifetime); dl.IsZero() || l.Before(dl) {
			dl = l
		}
	}
	return dl
}

func (e *Engine) receiveTimeout(now time.Time) {
	if e.lim.lifetime > 0 && !now.Before(e.start.Add(e.lim.lifetime)) {
		e.requestClose(closeFull, ReasonMaxLifetime)
		return
	}
	e.requestClose(closeFull, ReasonIdleTimeout)
}

func (e *Engine) lingerDeadline() (time.Time, LingerEnd) {
	dl, end := e.halfAt.Add(e.lim.lingerTime), LingerTime
	if mutating && e.mut&mutNoLingerTime != 0 {
		dl, end = time.Time{}, LingerTimeout
	}
	if e.lim.lingerTimeout > 0 && (dl.IsZero() || e.lastLinger.Add(e.lim.lingerTimeout).Before(dl)) {
		dl, end = e.lastLinger.Add(e.lim.lingerTimeout), LingerTimeout
	}
	return dl, end
}

// ReadDone reports the result of OpRead: the bytes read (the driver's
// buffer may be reused once ReadDone returns) and the error.
func (e *Engine) ReadDone(now time.Time, p []byte, err error) {
	e.now = now
	if len(p) > 0 && e.m.State() != fsm.Closed {
		e.input(p)
	}
	if err != nil && e.m.State() != fsm.Closed {
		e.readFailed(err)
	}
}

// readFailed handles a read's error. It is kept out of ReadDone, whose frame
// is on the path from the driver to the handler's OnData.
//
//go:noinline
func (e *Engine) readFailed(err error) {
	switch {
	case errors.Is(err, io.EOF):
		e.peerFIN()
	case errors.Is(err, os.ErrDeadlineExceeded):
		// A deadline passed (or the driver woke the read): Next checks the timers.
	case isReset(err):
		e.abort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
	default:
		e.abort(ReasonReadError, errors.Join(ErrIO, err))
	}
}

func (e *Engine) input(p []byte) {
	n := int64(len(p))
	if !e.fire(fsm.Input) {
		return
	}
	e.bytesIn += n
	if e.m.State() == fsm.HalfClosed {
		e.lingerRead += n
		e.lastLinger = e.now
		if e.closeReq == closeFull {
			e.discarded += n
			return
		}
	}
	e.callData(p)
}

func (e *Engine) peerFIN() {
	e.finWhileHalf = e.m.State() == fsm.HalfClosed
	if !e.fire(fsm.PeerFIN) {
		return
	}
	if e.hPeer != nil {
		e.callPeerClose()
	}
	if mutating && e.mut&mutIgnorePeerFIN != 0 {
		return
	}
	e.requestClose(closeFull, ReasonPeerClosed)
}

// WriteDone reports the result of OpWrite: how many bytes were written and
// the error.
func (e *Engine) WriteDone(now time.Time, n int, err error) {
	e.now = now
	if e.m.State() != fsm.Sending {
		if n > 0 && e.m.State() == fsm.Closed {
			e.bytesOut += int64(n) // the write an abort interrupted
		}
		return
	}
	if n > len(e.out)-e.outOff {
		n = len(e.out) - e.outOff
	}
	if n > 0 {
		e.outOff += n
		e.bytesOut += int64(n)
	}
	if e.outOff == len(e.out) {
		e.dropOutput()
		e.fire(fsm.Flushed)
		return
	}
	switch {
	case err == nil:
	case errors.Is(err, os.ErrDeadlineExceeded):
		e.abort(ReasonWriteTimeout, errors.Join(ErrWriteTimeout, err))
	case isReset(err):
		e.abort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
	default:
		e.abort(ReasonWriteError, errors.Join(ErrIO, err))
	}
}

// closeUnstarted closes, gracefully, a connection that never started: the
// server shut down during its TLS handshake.
func (e *Engine) closeUnstarted(now time.Time) {
	e.now, e.start = now, now
	if e.m.State() != fsm.Accepted {
		return
	}
	e.reason = ReasonShutdown
	e.fire(fsm.Close)
}

// handshakeFailed aborts a connection whose TLS handshake failed, before
// the engine started.
func (e *Engine) handshakeFailed(now time.Time, err error) {
	e.now, e.start = now, now
	e.abort(ReasonHandshake, errors.Join(ErrHandshake, err))
}

// CloseWriteDone reports the result of OpCloseWrite.
func (e *Engine) CloseWriteDone(now time.Time, err error) {
	e.now = now
	if e.m.State() != fsm.HalfClosed {
		return
	}
	e.finSent = true
	e.halfAt, e.lastLinger = now, now
	switch {
	case err == nil:
	case isReset(err):
		e.abort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
	default:
		e.abort(ReasonWriteError, errors.Join(ErrIO, err))
	}
}

// CloseDone reports that OpClose or OpAbort was performed. The handler's
// OnClose is called now, once.
func (e *Engine) CloseDone(now time.Time, _ error) {
	e.now = now
	if e.m.State() != fsm.Closed || e.closed {
		return
	}
	e.closed = true
	if mutating && e.mut&mutNotifyTwice != 0 && e.hClose != nil {
		e.callClose(e.CloseInfo())
	}
	if !e.notified {
		e.notified = true
		info := e.CloseInfo()
		if e.hClose != nil {
			e.callClose(info)
		}
		if e.onClose != nil {
			e.callHook(info)
		}
	}
}

// Shutdown asks for a graceful close on behalf of the server: queued output
// is flushed, then the engine half-closes and lingers. Input read after
// Shutdown is discarded.
func (e *Engine) Shutdown(now time.Time) {
	e.now = now
	e.requestClose(closeFull, ReasonShutdown)
}

// Abort closes the connection with RST at once, with reason
// ReasonShutdownDeadline and cause ErrShutdownDeadline.
func (e *Engine) Abort(now time.Time) {
	e.now = now
	e.debug = e.debugEnabled()
	e.abort(ReasonShutdownDeadline, ErrShutdownDeadline)
}

// CloseInfo says how the connection ended, or how it stands so far.
func (e *Engine) CloseInfo() CloseInfo {
	return CloseInfo{
		Reason:       e.reason,
		Err:          e.err,
		Linger:       e.linger,
		PeerFIN:      e.m.PeerFIN(),
		BytesRead:    e.bytesIn,
		BytesWritten: e.bytesOut,
		Discarded:    e.discarded,
		Duration:     e.now.Sub(e.start),
	}
}

// The handler's callbacks. A panic aborts the connection.

func (e *Engine) recoverHandler() {
	if r := recover(); r != nil {
		e.abort(ReasonHandlerPanic, &PanicError{Value: r, Stack: debug.Stack()})
	}
}

func (e *Engine) callOpen() {
	defer e.recoverHandler()
	e.hOpen.OnOpen(&e.conn)
}

func (e *Engine) callData(p []byte) {
	defer e.recoverHandler()
	e.h.OnData(&e.conn, p)
}

func (e *Engine) callPeerClose() {
	defer e.recoverHandler()
	e.hPeer.OnPeerClose(&e.conn)
}

func (e *Engine) callHook(info CloseInfo) {
	defer func() {
		if r := recover(); r != nil {
			e.logger().Error("panic in Config.OnClose", "panic", r, "stack", string(debug.Stack()))
		}
	}()
	e.onClose(e.info, info)
}

func (e *Engine) callClose(info CloseInfo) {
	defer func() {
		if r := recover(); r != nil {
			e.logger().Error("handler panic in OnClose", "panic", r, "stack", string(debug.Stack()))
		}
	}()
	e.hClose.OnClose(&e.conn, info)
}

// isReset reports whether err is the peer's RST.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED)
}
