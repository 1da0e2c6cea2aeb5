//go:build unix

package transport

import (
	"io"
	"net"
	"os"
	"syscall"
)

// socket is a connection with a descriptor: *net.TCPConn, *net.UnixConn.
type socket interface {
	net.Conn
	syscall.Conn
}

// rawReader reads a socket through its syscall.RawConn, with a buffer it
// borrows only when it has input to read into it: net.Conn's Read needs a
// buffer before it can wait, so a connection parked in it pins one. The
// adapters embed it, which makes them LazyReaders.
//
// Its frames are kept small: a connection parked in ReadLazy should stay
// within its goroutine's initial stack (TestIdleConnectionStack).
type rawReader struct {
	sock socket
	rc   syscall.RawConn
	fn   func(fd uintptr) bool // r.read, bound once: a method value built per call would allocate
	bufs *Buffers
	buf  *[]byte // borrowed from bufs; nil while waiting
	n    int
	err  error
}

func newRawReader(s socket) rawReader { return rawReader{sock: s} }

// ReadLazy implements LazyReader.
func (r *rawReader) ReadLazy(bufs *Buffers) ([]byte, error) {
	if r.rc == nil {
		if err := r.init(); err != nil {
			return nil, err
		}
	}
	if r.buf != nil && r.bufs != bufs {
		r.ReleaseBuffer()
	}
	r.bufs, r.n, r.err = bufs, 0, nil
	// RawConn.Read calls r.read, and while it returns false waits for the
	// socket to become readable, within the read deadline: errors from the
	// wait (deadline, closed) come back here, already a *net.OpError.
	if err := r.rc.Read(r.fn); err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, r.readError()
	}
	if r.n == 0 {
		return nil, io.EOF
	}
	// The capacity is cut too: the rest of the buffer may hold another
	// connection's input.
	return (*r.buf)[:r.n:r.n], nil
}

//go:noinline
func (r *rawReader) init() error {
	rc, err := r.sock.SyscallConn()
	if err != nil {
		return err
	}
	r.rc, r.fn = rc, r.read
	return nil
}

// readError wraps a failed read as net.Conn's Read does.
//
//go:noinline
func (r *rawReader) readError() error {
	e := &net.OpError{Op: "read", Source: r.sock.LocalAddr(), Addr: r.sock.RemoteAddr(), Err: os.NewSyscallError("read", r.err)}
	if e.Source != nil {
		e.Net = e.Source.Network()
	}
	return e
}

// read is the RawConn.Read callback: one non-blocking read. It returns false
// to wait for input, after giving the buffer back.
func (r *rawReader) read(fd uintptr) bool {
	if r.buf == nil {
		r.buf = r.bufs.Get()
	}
	for {
		n, err := sysRead(fd, *r.buf)
		switch err {
		case nil:
			r.n = n
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			r.ReleaseBuffer()
			return false
		default:
			r.err = err
			return true
		}
	}
}

// ReleaseBuffer implements LazyReader.
func (r *rawReader) ReleaseBuffer() {
	if r.buf != nil {
		r.bufs.Put(r.buf)
		r.buf = nil
	}
}
