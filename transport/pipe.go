package transport

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/internal/deadline"
)

// DefaultPipeSize is the capacity, in bytes, of each direction of a Pipe.
const DefaultPipeSize = 64 << 10

// ErrWriteAfterShutdown is wrapped by the error a Pipe end's Write returns
// after that end's CloseWrite.
var ErrWriteAfterShutdown = errors.New("sockfsm: transport: write after CloseWrite")

// PipeAddr is the address of one end of a Pipe: 1 for the first end
// returned, 2 for the second.
type PipeAddr int

// Network returns "pipe".
func (PipeAddr) Network() string { return "pipe" }

// String returns the address as "pipe:1" or "pipe:2".
func (a PipeAddr) String() string { return "pipe:" + strconv.Itoa(int(a)) }

// Pipe returns the two ends of an in-memory, buffered, full-duplex
// connection with DefaultPipeSize bytes of buffer in each direction. See
// PipeSize.
func Pipe() (Stream, Stream) { return PipeSize(DefaultPipeSize) }

// PipeSize returns the two ends of an in-memory, buffered, full-duplex
// connection that behaves like a kernel TCP socket pair, with capacity bytes
// of buffer in each direction. It panics if capacity is not positive.
//
// Write copies as much as fits into the peer's receive buffer and blocks for
// the rest until the peer reads or the write deadline passes; on a deadline
// it returns the count written so far. Concurrent Writes do not interleave.
//
// CloseWrite is a FIN: the peer reads what was sent and then io.EOF, our
// Write fails with ErrWriteAfterShutdown, and our Read keeps working.
//
// Close with unread data in our receive buffer resets the peer, as a kernel
// does: the peer's unread data is discarded and its Read and Write fail with
// syscall.ECONNRESET from then on. Otherwise Close is a FIN and the peer's
// Write fails with syscall.EPIPE. Abort always resets the peer. After Close
// or Abort our own methods fail with net.ErrClosed.
//
// All errors other than io.EOF are *net.OpError values; test them with
// errors.Is.
func PipeSize(capacity int) (Stream, Stream) {
	if capacity <= 0 {
		panic("sockfsm: transport: PipeSize: capacity must be positive")
	}
	p := &pipe{capacity: capacity}
	p.cond.L = &p.mu
	a := &pipeEnd{p: p, local: 1, remote: 2}
	b := &pipeEnd{p: p, local: 2, remote: 1}
	a.peer, b.peer = b, a
	return a, b
}

// pipe is the state shared by both ends. A single mutex guards both ends;
// cond is broadcast on every change a blocked call may be waiting for.
type pipe struct {
	mu       sync.Mutex
	cond     sync.Cond
	capacity int
}

// pipeEnd is one end of a pipe.
type pipeEnd struct {
	p             *pipe
	peer          *pipeEnd
	local, remote PipeAddr

	// Guarded by p.mu.
	rx      bytes.Buffer // written by the peer, not yet read
	closed  bool         // Close or Abort was called
	shut    bool         // no more writes: CloseWrite, Close or Abort was called
	reset   bool         // the peer reset the connection
	writing bool         // a Write is copying data
	rd, wd  deadline.Deadline
}

func (c *pipeEnd) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "pipe", Source: c.local, Addr: c.remote, Err: err}
}

// Read implements net.Conn.
func (c *pipeEnd) Read(b []byte) (int, error) {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		switch {
		case c.closed:
			return 0, c.opError("read", net.ErrClosed)
		case c.reset:
			return 0, c.opError("read", syscall.ECONNRESET)
		case c.rd.Expired():
			return 0, c.opError("read", os.ErrDeadlineExceeded)
		case len(b) == 0:
			return 0, nil
		case c.rx.Len() > 0:
			n, _ := c.rx.Read(b)
			p.cond.Broadcast() // room for the peer's Write
			return n, nil
		case c.peer.shut:
			return 0, io.EOF
		}
		p.cond.Wait()
	}
}

// Write implements net.Conn.
func (c *pipeEnd) Write(b []byte) (n int, err error) {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for c.writing {
		if err := c.writeErr(); err != nil {
			return 0, err
		}
		p.cond.Wait()
	}
	c.writing = true
	defer func() {
		c.writing = false
		p.cond.Broadcast()
	}()
	for {
		if err := c.writeErr(); err != nil {
			return n, err
		}
		if k := min(len(b)-n, p.capacity-c.peer.rx.Len()); k > 0 {
			c.peer.rx.Write(b[n : n+k])
			n += k
			p.cond.Broadcast() // data for the peer's Read
		}
		if n == len(b) {
			return n, nil
		}
		p.cond.Wait()
	}
}

// writeErr reports why Write cannot go on, or nil. p.mu must be held.
func (c *pipeEnd) writeErr() error {
	var err error
	switch {
	case c.closed:
		err = net.ErrClosed
	case c.shut:
		err = ErrWriteAfterShutdown
	case c.reset:
		err = syscall.ECONNRESET
	case c.peer.closed:
		err = syscall.EPIPE
	case c.wd.Expired():
		err = os.ErrDeadlineExceeded
	default:
		return nil
	}
	return c.opError("write", err)
}

// CloseWrite implements Stream: the peer reads io.EOF after the data already
// written.
func (c *pipeEnd) CloseWrite() error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.closed {
		return c.opError("close", net.ErrClosed)
	}
	c.shut = true
	c.p.cond.Broadcast()
	return nil
}

// Close implements net.Conn. It resets the peer if we hold unread data.
func (c *pipeEnd) Close() error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.closed {
		return c.opError("close", net.ErrClosed)
	}
	c.close(c.rx.Len() > 0)
	return nil
}

// Abort implements Stream: it closes c and resets the peer.
func (c *pipeEnd) Abort() error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.closed {
		return c.opError("close", net.ErrClosed)
	}
	c.close(true)
	return nil
}

// close closes c and, if rst, resets the peer. p.mu must be held.
func (c *pipeEnd) close(rst bool) {
	c.closed, c.shut = true, true
	c.rx = bytes.Buffer{}
	c.rd.Set(&c.p.cond, time.Time{})
	c.wd.Set(&c.p.cond, time.Time{})
	if rst && !c.peer.closed {
		c.peer.reset = true
		c.peer.rx = bytes.Buffer{}
	}
	c.p.cond.Broadcast()
}

// LocalAddr implements net.Conn.
func (c *pipeEnd) LocalAddr() net.Addr { return c.local }

// RemoteAddr implements net.Conn.
func (c *pipeEnd) RemoteAddr() net.Addr { return c.remote }

// SetDeadline implements net.Conn.
func (c *pipeEnd) SetDeadline(t time.Time) error { return c.setDeadline(t, true, true) }

// SetReadDeadline implements net.Conn.
func (c *pipeEnd) SetReadDeadline(t time.Time) error { return c.setDeadline(t, true, false) }

// SetWriteDeadline implements net.Conn.
func (c *pipeEnd) SetWriteDeadline(t time.Time) error { return c.setDeadline(t, false, true) }

func (c *pipeEnd) setDeadline(t time.Time, read, write bool) error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.closed {
		return c.opError("set", net.ErrClosed)
	}
	if read {
		c.rd.Set(&c.p.cond, t)
	}
	if write {
		c.wd.Set(&c.p.cond, t)
	}
	return nil
}
