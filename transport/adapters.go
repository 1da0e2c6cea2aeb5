package transport

import (
	"crypto/tls"
	"fmt"
	"net"
)

// TCP adapts c: CloseWrite sends our FIN and Abort sets SO_LINGER 0 before
// closing, so that the kernel sends RST and discards unsent data. On Unix
// systems the adapter is also a LazyReader.
func TCP(c *net.TCPConn) Stream { return &tcpConn{TCPConn: c, rawReader: newRawReader(c)} }

type tcpConn struct {
	*net.TCPConn
	rawReader
}

// Abort implements Stream.
func (c *tcpConn) Abort() error {
	lerr := c.SetLinger(0)
	if err := c.Close(); err != nil {
		return err
	}
	return lerr // closed, but gracefully
}

// Unix adapts c: CloseWrite shuts down our sending side. Unix sockets have no
// RST, so Abort is the same as Close. (On Linux, closing a Unix socket that
// holds unread input still makes the peer's Read fail with ECONNRESET.) On
// Unix systems the adapter is also a LazyReader.
func Unix(c *net.UnixConn) Stream { return &unixConn{UnixConn: c, rawReader: newRawReader(c)} }

type unixConn struct {
	*net.UnixConn
	rawReader
}

// Abort implements Stream.
func (c *unixConn) Abort() error { return c.Close() }

// TLS adapts c.
//
// CloseWrite sends a TLS close_notify alert and then shuts down the sending
// side of the underlying connection, so the peer also sees a FIN: tls.Conn's
// own CloseWrite sends only the alert. If the underlying connection is not
// one Wrap supports, only the alert is sent. If the alert cannot be sent
// (tls.Conn gives it a fixed 5 s write deadline, which a peer that reads
// slowly can exceed), the FIN is sent all the same and CloseWrite returns
// nil: everything written before was already handed to the kernel, and a
// FIN delivers it where an error (and the RST that follows) would destroy
// it; the peer's TLS layer then reports an unexpected EOF after the data.
// Since close_notify requires a
// completed handshake, CloseWrite first runs the handshake if it has not run
// yet, as Read and Write do, and returns its error if it fails, having sent
// nothing. tls.Conn's CloseWrite also leaves the write deadline in the past.
//
// Abort aborts the underlying connection (RST on TCP) without sending
// close_notify; later calls on c fail because that connection is closed.
func TLS(c *tls.Conn) Stream { return tlsConn{c} }

type tlsConn struct{ *tls.Conn }

// CloseWrite implements Stream.
func (c tlsConn) CloseWrite() error {
	if err := c.Handshake(); err != nil {
		return err
	}
	notifyErr := c.Conn.CloseWrite()
	if raw, err := Wrap(c.NetConn()); err == nil {
		return raw.CloseWrite()
	}
	if notifyErr != nil {
		return notifyErr
	}
	return nil
}

// Abort implements Stream.
func (c tlsConn) Abort() error {
	raw, err := Wrap(c.NetConn())
	if err != nil {
		return c.NetConn().Close()
	}
	return raw.Abort()
}

// Wrap returns c as a Stream: c itself if it already is one (a Pipe end, say),
// otherwise the adapter for *net.TCPConn, *net.UnixConn or *tls.Conn, or,
// for any other type with a CloseWrite() error method, a generic adapter
// whose Abort sets SO_LINGER 0 if c has SetLinger(int) error, then closes.
// A connection that cannot half-close is refused with an error wrapping
// ErrUnsupported: the engine cannot close it without risking an RST.
func Wrap(c net.Conn) (Stream, error) {
	switch c := c.(type) {
	case Stream:
		return c, nil
	case *net.TCPConn:
		return TCP(c), nil
	case *net.UnixConn:
		return Unix(c), nil
	case *tls.Conn:
		return TLS(c), nil
	case halfCloser:
		return genericConn{c}, nil
	}
	return nil, fmt.Errorf("%w: %T", ErrUnsupported, c)
}

type halfCloser interface {
	net.Conn
	CloseWrite() error
}

type genericConn struct{ halfCloser }

// Abort implements Stream.
func (c genericConn) Abort() error {
	if l, ok := c.halfCloser.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
	return c.Close()
}
