package sockfsm

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/internal/deadline"
)

// NetConn is the net.Conn face of a connection that a Listener accepted:
// the engine drives the socket (the same Engine, table and promises as
// Server's connections), and the application reads and writes it as it
// would a *net.TCPConn, from any goroutines.
//
//   - Read returns the input the engine read ahead for it, then io.EOF
//     after the peer's FIN. The engine reads ahead at most
//     Config.ReadBufferSize bytes; beyond that it stops reading, and TCP
//     flow control holds the peer back.
//   - Write returns once its bytes were handed to the transport, or when
//     its deadline passes (with the bytes queued so far counted in n: they
//     will still be sent). Beyond Config.MaxPendingOutput queued bytes it
//     waits.
//   - Close is graceful and returns at once: in the background the engine
//     flushes, sends our FIN, lingers within the Config's bounds reading
//     and discarding the peer's unread input, and then closes. Input the
//     application left unread is never answered with an RST that would
//     destroy its response (golang/go#51109).
//   - CloseWrite half-closes: our FIN, and Read goes on until the peer's.
//   - Abort, or SetLinger(0) then Close, closes with RST.
//   - Deadlines are the application's, with net.Conn's errors; the
//     engine's own timeouts are Config's (see Listener for what each means
//     on this face).
//
// Errors are *net.OpError values, as net.Conn's are.
type NetConn struct {
	c    *Conn
	info ConnInfo

	wmu  sync.Mutex // serializes Writes: each Write's bytes go out together
	mu   sync.Mutex
	cond sync.Cond // broadcast on every change a blocked call may wait for

	// Guarded by mu.
	in      []byte // read ahead, not yet read by the application
	limit   int    // reading pauses at this many bytes read ahead
	paused  bool
	eof     bool // the peer's FIN was read, after in
	closed  bool // Close was called
	linger0 bool // SetLinger(0): Close aborts
	ended   bool // the engine closed the transport
	end     CloseInfo
	flushes uint64 // the output queue was flushed this many times
	rd, wd  deadline.Deadline
}

func newNetConn(info ConnInfo, limit int) *NetConn {
	nc := &NetConn{info: info, limit: limit}
	nc.cond.L = &nc.mu
	return nc
}

// The engine's side: NetConn is the connection's Handler. The callbacks run
// on the connection's goroutine, with the engine's lock released.

// OnOpen implements OpenHandler: the application, not the peer's FIN,
// decides when the connection closes.
func (nc *NetConn) OnOpen(c *Conn) { c.Hold() }

// OnData implements Handler: the input is kept for Read.
func (nc *NetConn) OnData(c *Conn, p []byte) {
	nc.mu.Lock()
	if !nc.closed {
		nc.in = append(nc.in, p...)
		if len(nc.in) >= nc.limit && !nc.paused {
			nc.paused = true
			c.PauseRead()
		}
		nc.cond.Broadcast()
	}
	nc.mu.Unlock()
}

// OnPeerClose implements PeerCloseHandler: Read returns io.EOF once the
// input read ahead is read.
func (nc *NetConn) OnPeerClose(*Conn) {
	nc.mu.Lock()
	nc.eof = true
	nc.cond.Broadcast()
	nc.mu.Unlock()
}

// OnFlush implements FlushHandler: the Writes waiting for their bytes to
// leave may return.
func (nc *NetConn) OnFlush(*Conn) {
	nc.mu.Lock()
	nc.flushes++
	nc.cond.Broadcast()
	nc.mu.Unlock()
}

// OnClose implements CloseHandler.
func (nc *NetConn) OnClose(_ *Conn, info CloseInfo) {
	nc.mu.Lock()
	nc.ended, nc.end = true, info
	if info.Aborted() {
		nc.in = nil // an RST destroys what was received and not read
	}
	nc.rd.Stop()
	nc.wd.Stop()
	nc.cond.Broadcast()
	nc.mu.Unlock()
}

// The application's side.

func (nc *NetConn) opError(op string, err error) error {
	e := &net.OpError{Op: op, Source: nc.info.LocalAddr, Addr: nc.info.RemoteAddr, Err: err}
	if e.Source != nil {
		e.Net = e.Source.Network()
	}
	return e
}

// endError is the error of a Write on a connection the engine has closed
// without the application's Close: a reset's, or EPIPE after a graceful
// close (our FIN is out). mu must be held.
func (nc *NetConn) endError(op string) error {
	if nc.end.Aborted() {
		if nc.end.Reason == ReasonPeerReset {
			return nc.opError(op, syscall.ECONNRESET)
		}
		return nc.opError(op, nc.end.Err)
	}
	return nc.opError(op, syscall.EPIPE)
}

// Read implements net.Conn.
func (nc *NetConn) Read(b []byte) (int, error) {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	for {
		switch {
		case nc.closed:
			return 0, nc.opError("read", net.ErrClosed)
		case len(nc.in) > 0:
			if len(b) == 0 {
				return 0, nil
			}
			n := copy(b, nc.in)
			nc.consume(n)
			return n, nil
		case nc.eof:
			return 0, io.EOF
		case nc.ended:
			if nc.end.Aborted() {
				return 0, nc.endError("read")
			}
			if !nc.end.PeerFIN {
				// The engine closed before the peer's FIN (a linger
				// bound after the application's close): the input was
				// cut short, not ended.
				return 0, nc.opError("read", io.ErrUnexpectedEOF)
			}
			return 0, io.EOF
		case nc.rd.Expired():
			return 0, nc.opError("read", os.ErrDeadlineExceeded)
		case len(b) == 0:
			return 0, nil
		}
		nc.cond.Wait()
	}
}

// consume drops n bytes read by the application and resumes reading once
// half the read-ahead room is free. mu must be held.
func (nc *NetConn) consume(n int) {
	nc.in = nc.in[n:]
	if len(nc.in) == 0 {
		// Keep a small buffer for the next input; let a large one go.
		if cap(nc.in) > 4<<10 {
			nc.in = nil
		} else {
			nc.in = nc.in[:0:cap(nc.in)]
		}
	}
	if nc.paused && len(nc.in) <= nc.limit/2 {
		nc.paused = false
		nc.c.ResumeRead()
	}
}

// Write implements net.Conn.
func (nc *NetConn) Write(b []byte) (int, error) {
	nc.wmu.Lock()
	defer nc.wmu.Unlock()
	nc.mu.Lock()
	defer nc.mu.Unlock()
	n := 0
	for {
		switch {
		case nc.closed:
			return n, nc.opError("write", net.ErrClosed)
		case nc.ended:
			return n, nc.endError("write")
		case nc.wd.Expired():
			return n, nc.opError("write", os.ErrDeadlineExceeded)
		}
		if n < len(b) {
			seq := nc.flushes
			k, err := nc.c.Write(b[n:])
			n += k
			switch {
			case errors.Is(err, ErrShutdown):
				return n, nc.opError("write", syscall.EPIPE)
			case errors.Is(err, ErrOutputFull):
				nc.waitFlush(seq)
			}
			continue
		}
		// Everything is queued: wait until it has been handed to the
		// transport.
		seq := nc.flushes
		if nc.c.Buffered() == 0 {
			return n, nil
		}
		nc.waitFlush(seq)
	}
}

// waitFlush waits for a flush after seq, or any other change a Write
// must see (a deadline, a close). mu must be held.
func (nc *NetConn) waitFlush(seq uint64) {
	for nc.flushes == seq && !nc.closed && !nc.ended && !nc.wd.Expired() {
		nc.cond.Wait()
	}
}

// Close implements net.Conn: the graceful close described at NetConn.
// Blocked Reads and Writes return net.ErrClosed.
func (nc *NetConn) Close() error {
	nc.mu.Lock()
	if nc.closed {
		nc.mu.Unlock()
		return nc.opError("close", net.ErrClosed)
	}
	nc.closed = true
	abort := nc.linger0
	nc.in = nil
	nc.rd.Stop()
	nc.wd.Stop()
	nc.cond.Broadcast()
	nc.mu.Unlock()
	if abort {
		nc.c.Abort(nil)
		return nil
	}
	nc.c.Close() // ErrClosed: the engine is closing it already
	return nil
}

// CloseWrite half-closes the connection: once the bytes written so far are
// sent, our FIN. Read goes on until the peer's FIN.
func (nc *NetConn) CloseWrite() error {
	nc.mu.Lock()
	closed := nc.closed
	nc.mu.Unlock()
	if closed {
		return nc.opError("close", net.ErrClosed)
	}
	if err := nc.c.CloseWrite(); err != nil {
		return nc.opError("close", err)
	}
	return nil
}

// Abort closes the connection with RST at once, dropping what is queued.
func (nc *NetConn) Abort() error {
	nc.mu.Lock()
	nc.closed = true
	nc.in = nil
	nc.cond.Broadcast()
	nc.mu.Unlock()
	nc.c.Abort(nil)
	return nil
}

// SetLinger is *net.TCPConn's: SetLinger(0) makes Close abort with RST.
// Any other value keeps the graceful close, whose linger the Config bounds.
func (nc *NetConn) SetLinger(sec int) error {
	nc.mu.Lock()
	nc.linger0 = sec == 0
	nc.mu.Unlock()
	return nil
}

// LocalAddr implements net.Conn.
func (nc *NetConn) LocalAddr() net.Addr { return nc.info.LocalAddr }

// RemoteAddr implements net.Conn.
func (nc *NetConn) RemoteAddr() net.Addr { return nc.info.RemoteAddr }

// SetDeadline implements net.Conn.
func (nc *NetConn) SetDeadline(t time.Time) error { return nc.setDeadline(t, true, true) }

// SetReadDeadline implements net.Conn.
func (nc *NetConn) SetReadDeadline(t time.Time) error { return nc.setDeadline(t, true, false) }

// SetWriteDeadline implements net.Conn.
func (nc *NetConn) SetWriteDeadline(t time.Time) error { return nc.setDeadline(t, false, true) }

func (nc *NetConn) setDeadline(t time.Time, read, write bool) error {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	if nc.closed {
		return nc.opError("set", net.ErrClosed)
	}
	if read {
		nc.rd.Set(&nc.cond, t)
	}
	if write {
		nc.wd.Set(&nc.cond, t)
	}
	return nil
}

// Info identifies the connection.
func (nc *NetConn) Info() ConnInfo { return nc.info }

// CloseInfo says how the connection ended, once the engine has closed its
// transport (after the linger that follows Close); ok is false before.
func (nc *NetConn) CloseInfo() (info CloseInfo, ok bool) {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	return nc.end, nc.ended
}
