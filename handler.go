package sockfsm

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// Handler is a protocol running on the engine. The engine calls it from
// the connection's driver, one call at a time (on the connection's own
// goroutine with Server and ServeConn; on the loop with an event loop). A
// callback must not block for long: work that blocks belongs on another
// goroutine, which may use the Conn at any time.
//
// OnData must not keep p, nor write to it, after it returns: p is a read
// buffer that connections share (see Config.ReadBufferSize), and it may
// hold another connection's input the moment OnData has returned. Copy what
// must outlive the call; Conn.Write copies.
//
// A handler may also implement OpenHandler, PeerCloseHandler, DrainHandler
// and CloseHandler to hear of the other moments of the lifecycle.
type Handler interface {
	// OnData is called with each chunk of input.
	OnData(c *Conn, p []byte)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(c *Conn, p []byte)

// OnData calls f(c, p).
func (f HandlerFunc) OnData(c *Conn, p []byte) { f(c, p) }

// OpenHandler is implemented by handlers that want to act when the
// connection starts, for example to send a greeting.
type OpenHandler interface {
	OnOpen(c *Conn)
}

// PeerCloseHandler is implemented by handlers that want to hear of the
// peer's FIN. When OnPeerClose returns, the engine flushes what the handler
// wrote, half-closes and closes: a peer that has half-closed is never left in
// CLOSE_WAIT.
type PeerCloseHandler interface {
	OnPeerClose(c *Conn)
}

// DrainHandler is implemented by handlers that produce output faster than
// the peer may read it. OnDrain is called when the output queue has been
// flushed after a Write returned ErrOutputFull, as Node's 'drain' event:
// a producer that stopped on ErrOutputFull may resume.
type DrainHandler interface {
	OnDrain(c *Conn)
}

// FlushHandler is implemented by handlers that wait for their output to
// leave: OnFlush is called each time the whole output queue has been
// handed to the transport.
type FlushHandler interface {
	OnFlush(c *Conn)
}

// CloseHandler is implemented by handlers that want to hear how the
// connection ended. OnClose is called exactly once, last, after the
// transport is closed.
type CloseHandler interface {
	OnClose(c *Conn, info CloseInfo)
}

// Echo is the RFC 862 echo protocol: every chunk of input is written back.
// Its zero value is ready to use: sockfsm.Echo{}.
type Echo struct{}

// OnData writes p back.
func (Echo) OnData(c *Conn, p []byte) { c.Write(p) }

// ConnInfo identifies a connection in hooks and logs.
type ConnInfo struct {
	ID         uint64
	LocalAddr  net.Addr
	RemoteAddr net.Addr
}

// Conn is the handler's view of a connection. Its methods are safe for use
// by any goroutine at any time: from the handler's callbacks, and from
// other goroutines (a publisher pushing to a subscriber, a proxy's other
// side). A call from outside a callback wakes the connection's driver when
// it must act; output is flushed, and closes are taken, in the order the
// calls were made.
type Conn struct {
	e *Engine
}

// Info identifies the connection.
func (c *Conn) Info() ConnInfo { return c.e.info }

// State returns the connection's lifecycle state.
func (c *Conn) State() fsm.State { return c.e.State() }

// PeerClosed reports whether the peer's FIN has been seen.
func (c *Conn) PeerClosed() bool {
	c.e.mu.Lock()
	defer c.e.mu.Unlock()
	return c.e.m.PeerFIN()
}

// mayWrite reports whether output may still be queued.
func (e *Engine) mayWrite() bool {
	if e.closeKind != closeNone || e.abortAsked {
		return false
	}
	switch e.m.State() {
	case fsm.Accepted, fsm.Receiving, fsm.Sending:
		return true
	}
	return false
}

// Write queues p to be sent and returns at once; the engine flushes it, in
// order, after the callback in progress returns, or at once when called
// from another goroutine. Once the handler asked for a close or an abort, or
// the connection is half-closed, it returns ErrShutdown and queues nothing:
// nothing written after our half-close ever reaches the transport. (The
// owner's Engine.Close takes effect at the driver's next step; output
// queued until then is flushed before our FIN.) Beyond
// MaxPendingOutput it queues what fits and returns ErrOutputFull; a
// DrainHandler hears when the queue has drained.
func (c *Conn) Write(p []byte) (int, error) {
	e := c.e
	e.mu.Lock()
	if !e.mayWrite() {
		e.mu.Unlock()
		return 0, ErrShutdown
	}
	n, err := len(p), error(nil)
	if room := e.sh.lim.maxOut - (len(e.out) - e.outOff); n > room {
		n, err = max(room, 0), ErrOutputFull
		e.full = true
	}
	var wake Op
	if n > 0 {
		e.out = append(e.out, p[:n]...)
		wake = e.request(wakeRead)
	}
	e.mu.Unlock()
	e.wake(wake)
	return n, err
}

// Buffered returns the number of bytes queued and not yet handed to the
// transport.
func (c *Conn) Buffered() int {
	c.e.mu.Lock()
	defer c.e.mu.Unlock()
	return len(c.e.out) - c.e.outOff
}

// Available returns how many more bytes Write would queue now without
// ErrOutputFull; zero once writing is shut down.
func (c *Conn) Available() int {
	e := c.e
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.mayWrite() {
		return 0
	}
	return max(0, e.sh.lim.maxOut-(len(e.out)-e.outOff))
}

// CloseWrite asks for a half-close: once the queued output is flushed the
// engine sends our FIN. Input that arrives afterwards is still handed to
// OnData, within the linger bounds, until the peer's FIN. It returns
// ErrClosed if the connection is already being closed (Closing, Aborting,
// Closed) or an abort was asked for; a call after a close or half-close was
// asked changes nothing.
func (c *Conn) CloseWrite() error { return c.e.askCloseAndWake(closeHalf, ReasonHandlerClose) }

// Close asks for a graceful close: flush the queued output, half-close,
// discard input until the peer's FIN within the linger bounds, close. It
// returns at once. After CloseWrite it turns the half-close into a close
// (input is discarded from then on). It returns ErrClosed if the connection
// is already being closed (Closing, Aborting, Closed) or an abort was asked
// for.
func (c *Conn) Close() error { return c.e.askCloseAndWake(closeFull, ReasonHandlerClose) }

func (e *Engine) askCloseAndWake(k closeKind, r Reason) error {
	e.mu.Lock()
	changed, err := e.askClose(k, r)
	wake := Op(0)
	if changed {
		wake = e.request(wakeClose)
	}
	e.mu.Unlock()
	e.wake(wake)
	return err
}

// Abort closes the connection with RST as soon as its driver can: at once
// from a callback, or by waking the driver from another goroutine. Queued
// output is dropped. err, which may be nil, is reported in CloseInfo.Err,
// joined to ErrAborted.
func (c *Conn) Abort(err error) {
	e := c.e
	e.mu.Lock()
	e.askAbort(ReasonHandlerAbort, errors.Join(ErrAborted, err))
	wake := e.request(wakeAbort)
	e.mu.Unlock()
	e.wake(wake)
}

// Do runs f on the connection's driver, as a callback (x/net/quic's
// runOnLoop): after the callback in progress, or as soon as the driver
// wakes. Functions run in the order Do was called, each exactly once, even
// if the connection closes first (before OnClose, so f's Writes then return
// ErrShutdown). Do returns ErrClosed, and f never runs, once the transport
// is closed: the last tasks are running, or OnClose was called.
func (c *Conn) Do(f func(c *Conn)) error {
	e := c.e
	e.mu.Lock()
	if e.notified || e.lastTasks {
		e.mu.Unlock()
		return ErrClosed
	}
	cs := e.coldState()
	cs.tasks = append(cs.tasks, f)
	wake := e.request(wakeRead)
	e.mu.Unlock()
	e.wake(wake)
	return nil
}

// Hold keeps the connection open after the peer's FIN until the handler
// closes it, as the user of a net.Conn does: without it the engine
// half-closes once the answer to the peer's FIN is flushed, so that no
// socket is left in CLOSE_WAIT. After a held connection's CloseWrite the
// linger bounds do not apply either: its handler still takes the input,
// as a net.Conn's user reads after CloseWrite, and the linger and its
// bounds start at its Close. A handler that holds must close. Call it in
// OnOpen.
func (c *Conn) Hold() {
	c.e.mu.Lock()
	c.e.held = true
	c.e.mu.Unlock()
}

// PauseRead stops reading input: backpressure for a handler that cannot
// take more yet (a proxy whose other side is full). A read already under
// way may still deliver one chunk. While reading is paused, IdleTimeout
// and MinRate do not run (MaxLifetime and the linger bounds do), and a peer that keeps
// sending is held back by TCP flow control. A handler that never resumes
// holds the connection: pair it with ResumeRead.
func (c *Conn) PauseRead() {
	c.e.mu.Lock()
	c.e.paused = true
	c.e.rateFrom, c.e.rateIn = 0, 0 // a pause ends the MinRate window
	c.e.mu.Unlock()
}

// ResumeRead resumes reading after PauseRead; the idle timer starts again.
func (c *Conn) ResumeRead() {
	e := c.e
	e.mu.Lock()
	var wake Op
	if e.paused {
		e.paused, e.idleReset = false, true
		wake = e.request(wakeRead)
	}
	e.mu.Unlock()
	e.wake(wake)
}

// Reason says why a connection closed.
type Reason uint8

// The reasons a connection closes. The first group closes gracefully (our
// FIN, then linger); the second aborts (RST); the last, added later,
// closes gracefully.
const (
	ReasonNone Reason = iota
	// ReasonPeerClosed: the peer sent its FIN; we answered and closed.
	ReasonPeerClosed
	// ReasonHandlerClose: the handler called Close or CloseWrite.
	ReasonHandlerClose
	// ReasonIdleTimeout: no input for IdleTimeout while Receiving.
	ReasonIdleTimeout
	// ReasonMaxLifetime: the connection reached MaxLifetime.
	ReasonMaxLifetime
	// ReasonShutdown: the engine's owner closed it: Server.Shutdown,
	// Engine.Close.
	ReasonShutdown

	// ReasonPeerReset: the peer reset the connection.
	ReasonPeerReset
	// ReasonReadError: a read failed.
	ReasonReadError
	// ReasonWriteError: a write or the half-close failed.
	ReasonWriteError
	// ReasonWriteTimeout: the peer did not read our output within
	// WriteTimeout.
	ReasonWriteTimeout
	// ReasonHandlerAbort: Conn.Abort was called.
	ReasonHandlerAbort
	// ReasonHandlerPanic: the handler panicked.
	ReasonHandlerPanic
	// ReasonShutdownDeadline: the server's Shutdown context ended, or Close
	// was called, or ServeConn's context was canceled.
	ReasonShutdownDeadline
	// ReasonHandshake: the TLS handshake failed or did not finish within
	// IdleTimeout (WriteTimeout if IdleTimeout is off).
	ReasonHandshake
	// ReasonAborted: Engine.Abort was called with a cause that names no
	// other reason.
	ReasonAborted
	// ReasonInternal: the engine hit a bug (an illegal transition), or a
	// panic escaped the engine.
	ReasonInternal

	// ReasonMinRate: the peer's input stayed below Config.MinRate over a
	// window. It closes gracefully, as the first group does; it comes
	// last so that the other reasons keep their values.
	ReasonMinRate
)

var reasonNames = [...]string{"none", "peer-closed", "handler-close", "idle-timeout", "max-lifetime", "shutdown",
	"peer-reset", "read-error", "write-error", "write-timeout", "handler-abort", "handler-panic", "shutdown-deadline", "handshake", "aborted", "internal",
	"min-rate"}

// String returns the reason's name.
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint8(r))
}

// Abortive reports whether connections closed for r are closed with RST.
func (r Reason) Abortive() bool { return r >= ReasonPeerReset && r <= ReasonInternal }

// LingerEnd says how the linger after our half-close ended.
type LingerEnd uint8

// How lingering ends.
const (
	// LingerEndNone: there was no linger (the peer's FIN came first, or the
	// connection was aborted).
	LingerEndNone LingerEnd = iota
	// LingerEndPeerFIN: the peer's FIN arrived while lingering.
	LingerEndPeerFIN
	// LingerEndTimeout: a linger read waited Config.LingerTimeout.
	LingerEndTimeout
	// LingerEndTime: the linger lasted Config.LingerTime.
	LingerEndTime
	// LingerEndBytes: Config.LingerBytes were read while lingering.
	LingerEndBytes
)

var lingerNames = [...]string{"none", "peer-fin", "timeout", "time", "bytes"}

// String returns the linger end's name.
func (l LingerEnd) String() string {
	if int(l) < len(lingerNames) {
		return lingerNames[l]
	}
	return fmt.Sprintf("LingerEnd(%d)", uint8(l))
}

// CloseInfo says how a connection ended.
type CloseInfo struct {
	// Reason is why the connection closed. Abortive reasons mean RST.
	Reason Reason
	// Err is the cause of an abort, matching one of the package's sentinel
	// errors with errors.Is (for ReasonInternal, an *fsm.TransitionError);
	// nil for graceful closes.
	Err error
	// Linger says how the linger after our FIN ended.
	Linger LingerEnd
	// PeerFIN reports whether the peer's FIN was seen.
	PeerFIN bool
	// BytesRead counts input read, including bytes discarded while
	// lingering; BytesWritten counts output that reached the transport.
	BytesRead, BytesWritten int64
	// Discarded counts input read and discarded while lingering.
	Discarded int64
	// Duration is how long the connection lived.
	Duration time.Duration
}

// Aborted reports whether the connection was closed with RST.
func (i CloseInfo) Aborted() bool { return i.Reason.Abortive() }
