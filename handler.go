package sockfsm

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// Handler is a protocol running on the engine. The engine calls it from the
// connection's goroutine, one call at a time; it must not block for long and
// must not keep p, nor write to it, after OnData returns: p is a read buffer
// that connections share (see Config.ReadBufferSize), and it may hold
// another connection's input the moment OnData has returned. Copy what must
// outlive the call; Conn.Write copies.
//
// A handler may also implement OpenHandler, PeerCloseHandler and
// CloseHandler to hear of the other moments of the lifecycle.
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

// CloseHandler is implemented by handlers that want to hear how the
// connection ended. OnClose is called exactly once, last, after the
// transport is closed.
type CloseHandler interface {
	OnClose(c *Conn, info CloseInfo)
}

// Echo is the RFC 862 echo protocol: every chunk of input is written back.
var Echo Handler = HandlerFunc(func(c *Conn, p []byte) { c.Write(p) })

// ConnInfo identifies a connection in hooks and logs.
type ConnInfo struct {
	ID         uint64
	LocalAddr  net.Addr
	RemoteAddr net.Addr
}

// Conn is the handler's view of a connection. Its methods may be called only
// from within the handler's callbacks.
type Conn struct {
	e *Engine
}

// Info identifies the connection.
func (c *Conn) Info() ConnInfo { return c.e.info }

// State returns the connection's lifecycle state.
func (c *Conn) State() fsm.State { return c.e.m.State() }

// PeerClosed reports whether the peer's FIN has been seen.
func (c *Conn) PeerClosed() bool { return c.e.m.PeerFIN() }

// Write queues p to be sent; the engine flushes it when the callback
// returns. After CloseWrite, Close or Abort, or once the connection is
// half-closed, it returns ErrShutdown and queues nothing. Beyond
// MaxPendingOutput it queues what fits and returns ErrOutputFull.
func (c *Conn) Write(p []byte) (int, error) { return c.e.write(p) }

// CloseWrite asks for a half-close: once the queued output is flushed the
// engine sends our FIN. Input that arrives afterwards is still handed to
// OnData, within the linger bounds, until the peer's FIN.
func (c *Conn) CloseWrite() error { return c.e.requestClose(closeHalf, ReasonHandlerClose) }

// Close asks for a graceful close: flush the queued output, half-close,
// discard input until the peer's FIN within the linger bounds, close.
func (c *Conn) Close() error { return c.e.requestClose(closeFull, ReasonHandlerClose) }

// Abort closes the connection at once with RST; queued output is dropped.
// err, which may be nil, is reported in CloseInfo.Err.
func (c *Conn) Abort(err error) { c.e.abort(ReasonHandlerAbort, errors.Join(ErrAborted, err)) }

// Reason says why a connection closed.
type Reason uint8

// The reasons a connection closes. The first group closes gracefully (our
// FIN, then linger); the second aborts (RST).
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
	// ReasonShutdown: the server is shutting down.
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
	// ReasonHandlerAbort: the handler called Abort.
	ReasonHandlerAbort
	// ReasonHandlerPanic: the handler panicked.
	ReasonHandlerPanic
	// ReasonShutdownDeadline: the server's Shutdown context ended, or Close
	// was called, or ServeConn's context was canceled.
	ReasonShutdownDeadline
	// ReasonHandshake: the TLS handshake failed or did not finish within
	// IdleTimeout (WriteTimeout if IdleTimeout is off).
	ReasonHandshake
	// ReasonInternal: the engine hit a bug (an illegal transition).
	ReasonInternal
)

var reasonNames = [...]string{"none", "peer-closed", "handler-close", "idle-timeout", "max-lifetime", "shutdown",
	"peer-reset", "read-error", "write-error", "write-timeout", "handler-abort", "handler-panic", "shutdown-deadline", "handshake", "internal"}

// String returns the reason's name.
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint8(r))
}

// Abortive reports whether connections closed for r are closed with RST.
func (r Reason) Abortive() bool { return r >= ReasonPeerReset }

// LingerEnd says how the linger after our half-close ended.
type LingerEnd uint8

// How lingering ends.
const (
	// LingerNone: there was no linger (the peer's FIN came first, or the
	// connection was aborted).
	LingerNone LingerEnd = iota
	// LingerPeerFIN: the peer's FIN arrived.
	LingerPeerFIN
	// LingerTimeout: a read waited LingerTimeout.
	LingerTimeout
	// LingerTime: the linger lasted LingerTime.
	LingerTime
	// LingerBytes: LingerBytes were read.
	LingerBytes
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
