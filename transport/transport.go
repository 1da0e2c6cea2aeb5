// Package transport adapts byte streams to the small interface the sockfsm
// engine drives: read, write, half-close, close, abort, deadlines and
// addresses.
//
// The adapters here are TCP (TCP), Unix stream sockets (Unix), TLS (TLS) and
// an in-memory pair with real half-close semantics (Pipe). Wrap picks the
// right adapter for a net.Conn. This package never imports the engine: the
// engine declares the interface it consumes, which Stream satisfies.
package transport

import (
	"errors"
	"net"
)

// Stream is a full-duplex byte stream that can be half-closed and aborted.
//
// Read, Write, Close, the deadline setters and the address getters behave as
// they do on net.Conn. Deadline expiry makes Read and Write return an error
// for which errors.Is(err, os.ErrDeadlineExceeded) holds.
type Stream interface {
	net.Conn

	// CloseWrite shuts down the sending side: the peer reads end of file
	// once it has read everything sent before. The receiving side stays
	// open. On TCP this sends our FIN (shutdown(SD_SEND) in Winsock).
	CloseWrite() error

	// Abort closes the connection abortively: on TCP the kernel sends RST
	// instead of FIN (SO_LINGER 0) and discards unsent data. Use it only
	// for errors and timeouts; a graceful close is CloseWrite, drain, Close.
	Abort() error
}

// ErrUnsupported is returned by Wrap for a net.Conn it has no adapter for.
var ErrUnsupported = errors.New("sockfsm: transport: unsupported connection type")
