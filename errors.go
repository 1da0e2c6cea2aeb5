package sockfsm

import (
	"errors"
	"fmt"
)

// Sentinel errors. Match them with errors.Is.
var (
	// ErrShutdown is returned by Conn.Write once a close or an abort was
	// asked for, or the connection is half-closed or closed: nothing more
	// may be sent.
	ErrShutdown = errors.New("sockfsm: write after shutdown")
	// ErrOutputFull is returned by Conn.Write beyond MaxPendingOutput.
	ErrOutputFull = errors.New("sockfsm: output buffer full")
	// ErrServerClosed is returned by Serve and ListenAndServe after
	// Shutdown or Close.
	ErrServerClosed = errors.New("sockfsm: server closed")
	// ErrNoHandler is returned by Serve when Server.NewHandler is nil, and
	// by NewEngine and ServeConn when the handler is nil.
	ErrNoHandler = errors.New("sockfsm: no handler")

	// ErrPeerReset is the cause of a connection the peer reset.
	ErrPeerReset = errors.New("sockfsm: connection reset by peer")
	// ErrWriteTimeout is the cause of a connection whose peer did not read
	// its output within WriteTimeout.
	ErrWriteTimeout = errors.New("sockfsm: write timeout")
	// ErrAborted is the cause of a connection aborted on request:
	// Conn.Abort, or Engine.Abort with a cause of its own.
	ErrAborted = errors.New("sockfsm: aborted")
	// ErrClosed is returned by Conn.Close, Conn.CloseWrite and
	// Engine.Close when the connection is already closing or aborting, and
	// by Conn.Do once the connection is closed.
	ErrClosed = errors.New("sockfsm: connection closed")
	// ErrHandlerPanic is the cause of a connection whose handler panicked.
	ErrHandlerPanic = errors.New("sockfsm: handler panic")
	// ErrShutdownDeadline is the cause of a connection aborted because the
	// server's shutdown deadline passed, the server was closed, or the
	// context given to ServeConn ended.
	ErrShutdownDeadline = errors.New("sockfsm: aborted at shutdown deadline")
	// ErrHandshake is the cause of a connection whose TLS handshake failed
	// or timed out; the transport's error is joined to it.
	ErrHandshake = errors.New("sockfsm: tls handshake failed")
	// ErrProxyHeader is the reason a connection is refused when its PROXY
	// protocol header is missing, malformed or late (package
	// github.com/sockfsm/sockfsm/proxy); it wraps the parser's error.
	// See Config.Prelude and Config.OnRefuse.
	ErrProxyHeader = errors.New("sockfsm: bad or missing PROXY protocol header")
	// ErrTooManyConnsFromIP is the reason a connection is refused when its
	// source address already has Config.MaxConnsPerIP connections open.
	ErrTooManyConnsFromIP = errors.New("sockfsm: too many connections from one address")
	// ErrPrelude wraps the error of a Config.Prelude that failed
	// without saying why with a sentinel of its own.
	ErrPrelude = errors.New("sockfsm: connection prelude failed")

	// ErrIO is the cause of a connection aborted after a read, write or
	// half-close error; the transport's error is joined to it.
	ErrIO = errors.New("sockfsm: i/o error")
)

// PanicError is the cause of a connection whose handler panicked. It
// matches ErrHandlerPanic.
type PanicError struct {
	Value any
	Stack []byte
}

// Error implements error.
func (e *PanicError) Error() string { return fmt.Sprintf("sockfsm: handler panic: %v", e.Value) }

// Is reports whether target is ErrHandlerPanic.
func (e *PanicError) Is(target error) bool { return target == ErrHandlerPanic }

// RefusalReason names the reason of a refusal reported to Config.OnRefuse,
// for a metric's label or a log: "too-many-conns-from-ip" (matching
// ErrTooManyConnsFromIP), "proxy-header" (ErrProxyHeader), "prelude"
// (ErrPrelude) or, for any other error, "other". The names are few and
// stable: a label's cardinality stays bounded.
func RefusalReason(reason error) string {
	switch {
	case errors.Is(reason, ErrTooManyConnsFromIP):
		return "too-many-conns-from-ip"
	case errors.Is(reason, ErrProxyHeader):
		return "proxy-header"
	case errors.Is(reason, ErrPrelude):
		return "prelude"
	}
	return "other"
}
