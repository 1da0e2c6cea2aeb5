// Package proxy reads the PROXY protocol header (v1 and v2, HAProxy's
// proxy-protocol.txt) that HAProxy, Envoy and cloud load balancers send
// ahead of a TCP connection's data, so that sockfsm sees the client behind
// the load balancer: ConnInfo.RemoteAddr, the handler's logs and
// Config.MaxConnsPerIP all use the client's address from the header.
//
// Use it as the Config.Prelude of a sockfsm.Server, a loop.Server (the
// event-loop driver) or a sockfsm.Listener (for net/http and the like):
//
//	srv.Config.Prelude = proxy.Prelude(proxy.Required)
//
// # Design
//
// The header is read before the connection exists for the engine, on the
// connection's own goroutine, with the deadline Config.PreludeTimeout: the
// Server runs a Prelude off its accepting goroutine, so a peer that sends
// its header slowly, or never, delays only itself and is closed at the
// deadline; ConnInfo, NewHandler and the Engine come after it, with the
// client's address. sockfsm.Listener does the same off its caller's
// accept loop: its Accept hands out connections whose header was read. The
// core package knows nothing of the protocol (Config.Prelude is a plain
// hook), so it does not import go-proxyproto. A wrapper of net.Listener
// whose connections read the header lazily, on their first Read or
// RemoteAddr (go-proxyproto's own Listener), would not do here: sockfsm
// builds ConnInfo, and a handler may use it, before the first read.
//
// The header is read exactly, never past its end: v2 by its length field,
// v1 (a text line) in the largest reads the grammar allows and then byte by
// byte to its CRLF. So nothing of the client's data is read ahead, and the
// connection served is the TCP connection itself, with its addresses
// replaced and its zero-copy lazy reads kept (transport.LazyReader). It is
// a sockfsm.Readdressed, so the event-loop driver serves its socket
// directly. The bytes read are parsed and checked by
// github.com/pires/go-proxyproto.
//
// # Modes
//
// Required (go-proxyproto's REQUIRE policy): a connection whose header is
// missing, malformed or not complete within PreludeTimeout is refused:
// closed at once, logged once at warn level, and reported to
// Config.OnRefuse with an error matching sockfsm.ErrProxyHeader (the
// parser's error wrapped in it). Nothing else is affected.
//
// Optional (go-proxyproto's USE policy): the header is used if present,
// and a connection without one is served with the peer's own address. It
// looks at the first bytes without consuming them (MSG_PEEK; Unix
// systems only), so a connection without a header loses nothing. A peer
// that sends nothing at first (a protocol where the server speaks first),
// or whose first bytes are a signature's strict prefix ("PRO") and then
// pauses, waits until PreludeTimeout, and is then served without a
// header. A malformed header is still refused.
//
// Either way, a header's LOCAL command (a proxy's own health check) or
// UNKNOWN address family leaves the peer's addresses in place, as the
// specification says. Only what the load balancer sends should reach a
// port that trusts its headers: any peer that can connect can claim any
// address.
package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/pires/go-proxyproto"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/transport"
)

// Mode says whether the PROXY protocol is used.
type Mode int

const (
	// Off: no header is read.
	Off Mode = iota
	// Required: every connection must begin with a valid header.
	Required
	// Optional: a header is used if present.
	Optional
)

// String returns the mode's name, as ParseMode reads it.
func (m Mode) String() string {
	switch m {
	case Off:
		return "off"
	case Required:
		return "required"
	case Optional:
		return "optional"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses "off", "required" or "optional".
func ParseMode(s string) (Mode, error) {
	for _, m := range []Mode{Off, Required, Optional} {
		if s == m.String() {
			return m, nil
		}
	}
	return Off, fmt.Errorf("proxy: unknown mode %q (off, required or optional)", s)
}

// Prelude returns a sockfsm.Config.Prelude that reads the PROXY protocol
// header in mode m, or nil for Off. It panics on an unknown mode.
func Prelude(m Mode) func(net.Conn) (net.Conn, error) {
	switch m {
	case Off:
		return nil
	case Required:
		return func(c net.Conn) (net.Conn, error) { return prelude(c, false) }
	case Optional:
		return func(c net.Conn) (net.Conn, error) { return prelude(c, true) }
	}
	panic("proxy: unknown mode " + m.String())
}

// errNoHeader is wrapped in ErrProxyHeader for a connection without one.
var errNoHeader = errors.New("proxy: no PROXY protocol header")

func prelude(c net.Conn, optional bool) (net.Conn, error) {
	if optional {
		present, err := peekSignature(c)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return c, nil // nothing sent yet: no header
			}
			return nil, fmt.Errorf("%w: %w", sockfsm.ErrProxyHeader, err)
		}
		if !present {
			return c, nil
		}
	}
	raw, err := readHeader(c)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", sockfsm.ErrProxyHeader, err)
	}
	br := bufio.NewReaderSize(bytes.NewReader(raw), len(raw))
	h, err := proxyproto.Read(br)
	if err == nil && br.Buffered() != 0 {
		err = fmt.Errorf("proxy: %d bytes after the header's end", br.Buffered())
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", sockfsm.ErrProxyHeader, err)
	}
	return apply(c, h)
}

// apply returns c with the addresses of header h.
func apply(c net.Conn, h *proxyproto.Header) (net.Conn, error) {
	if h.Command.IsLocal() || h.TransportProtocol == proxyproto.UNSPEC {
		return c, nil // the proxy's own connection, or an unknown family: keep the peer's
	}
	if !h.TransportProtocol.IsStream() {
		return nil, fmt.Errorf("%w: a datagram (%#x) header on a stream connection", sockfsm.ErrProxyHeader, byte(h.TransportProtocol))
	}
	if h.SourceAddr == nil || h.DestinationAddr == nil {
		return nil, fmt.Errorf("%w: header without addresses", sockfsm.ErrProxyHeader)
	}
	s, err := transport.Wrap(c)
	if err != nil {
		return nil, err
	}
	pc := &conn{Stream: s, base: c, local: h.DestinationAddr, remote: h.SourceAddr}
	if lr, ok := s.(transport.LazyReader); ok {
		return &lazyConn{conn: pc, LazyReader: lr}, nil
	}
	return pc, nil
}

// conn is a connection with the addresses of its PROXY header: the
// client's as RemoteAddr, the one the client connected to as LocalAddr.
// It is a sockfsm.Readdressed: the header was read exactly, so the loop
// driver may serve its socket directly.
type conn struct {
	transport.Stream
	base          net.Conn // the connection the prelude was given
	local, remote net.Addr
}

func (c *conn) LocalAddr() net.Addr  { return c.local }
func (c *conn) RemoteAddr() net.Addr { return c.remote }

// Readdressed implements sockfsm.Readdressed.
func (c *conn) Readdressed() net.Conn { return c.base }

// lazyConn is a conn over a transport that reads lazily (TCP on Unix).
type lazyConn struct {
	*conn
	transport.LazyReader
}

// The lengths of the header's parts: see HAProxy's proxy-protocol.txt.
const (
	v1MaxLen   = 107 // "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
	v2FixedLen = 16  // signature, version and command, family, length
)

// headerReader reads one PROXY header from c, and not a byte more: every
// read asks for no more than the shortest header that what was read so far
// allows.
type headerReader struct {
	c   net.Conn
	buf []byte // the header's bytes read so far
}

// fill reads until len(r.buf) == n.
func (r *headerReader) fill(n int) error {
	if n > cap(r.buf) {
		r.buf = append(make([]byte, 0, n), r.buf...)
	}
	k, err := io.ReadFull(r.c, r.buf[len(r.buf):n])
	r.buf = r.buf[:len(r.buf)+k]
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = fmt.Errorf("proxy: the connection ended after %d bytes of the header: %w", len(r.buf), io.ErrUnexpectedEOF)
	}
	return err
}

// readHeader reads one PROXY header from c and returns its bytes, for the
// parser.
func readHeader(c net.Conn) ([]byte, error) {
	r := &headerReader{c: c, buf: make([]byte, 0, 64)}
	if err := r.fill(1); err != nil {
		return nil, err
	}
	switch r.buf[0] {
	case proxyproto.SIGV1[0]:
		return r.readV1()
	case proxyproto.SIGV2[0]:
		if err := r.fill(v2FixedLen); err != nil {
			return nil, err
		}
		if !bytes.Equal(r.buf[:len(proxyproto.SIGV2)], proxyproto.SIGV2) {
			return nil, errNoHeader
		}
		n := int(binary.BigEndian.Uint16(r.buf[14:16]))
		if err := r.fill(v2FixedLen + n); err != nil {
			return nil, err
		}
		return r.buf, nil
	}
	return nil, errNoHeader
}

// readV1 reads the rest of a v1 header, a line of at most 107 bytes that
// begins "PROXY TCP4 ", "PROXY TCP6 " or "PROXY UNKNOWN".
func (r *headerReader) readV1() ([]byte, error) {
	if err := r.fill(len("PROXY TCP4 ")); err != nil {
		return nil, err
	}
	if !bytes.Equal(r.buf[:5], proxyproto.SIGV1) {
		return nil, errNoHeader
	}
	// The shortest line each protocol allows.
	shortest := len("PROXY UNKNOWN\r\n")
	switch string(r.buf[6:10]) {
	case "TCP4":
		shortest = len("PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n")
	case "TCP6":
		shortest = len("PROXY TCP6 :: :: 0 0\r\n")
	}
	if err := r.fill(shortest); err != nil {
		return nil, err
	}
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			if i != len(r.buf)-1 || r.buf[i-1] != '\r' {
				return nil, proxyproto.ErrLineMustEndWithCrlf
			}
			return r.buf, nil
		}
		if len(r.buf) >= v1MaxLen {
			return nil, proxyproto.ErrVersion1HeaderTooLong
		}
		if err := r.fill(len(r.buf) + 1); err != nil {
			return nil, err
		}
	}
}
