package transport

import (
	"sync"
	"sync/atomic"
)

// Buffers lends read buffers of one size to connections, so that a
// connection holds one only while it has input to hand over: an idle
// connection whose transport is a LazyReader holds none. It is safe for
// concurrent use.
type Buffers struct {
	size     int
	borrowed atomic.Int64
	pool     sync.Pool // of *[]byte, so that Put does not allocate
}

// NewBuffers returns a pool of buffers of size bytes. It panics if size is
// not positive.
func NewBuffers(size int) *Buffers {
	if size <= 0 {
		panic("sockfsm: transport: NewBuffers: size must be positive")
	}
	b := &Buffers{size: size}
	b.pool.New = func() any {
		p := make([]byte, size)
		return &p
	}
	return b
}

// Size returns the length of every buffer b lends.
func (b *Buffers) Size() int { return b.size }

// Get borrows a buffer of Size bytes. Its contents are whatever its last
// borrower left in it.
func (b *Buffers) Get() *[]byte {
	b.borrowed.Add(1)
	return b.pool.Get().(*[]byte)
}

// Put returns a buffer that Get lent. The caller must not use it afterwards.
// Put(nil) does nothing.
func (b *Buffers) Put(p *[]byte) {
	if p == nil {
		return
	}
	b.borrowed.Add(-1)
	if cap(*p) != b.size {
		return // not one of ours: dropped, so that Get's size holds
	}
	*p = (*p)[:b.size]
	b.pool.Put(p)
}

// Borrowed returns how many buffers are lent out: for metrics, and for
// tests that check that idle connections hold none and that every buffer
// comes back.
func (b *Buffers) Borrowed() int64 { return b.borrowed.Load() }

// LazyReader is implemented by transports that can wait for input without
// holding a read buffer: on Unix systems, the TCP and Unix adapters. The
// engine's driver prefers ReadLazy to Read when its transport has it, so
// that an idle connection pins no read buffer (docs/performance.md).
//
// ReadLazy and ReleaseBuffer must not be called concurrently with each
// other. The deadlines apply to ReadLazy as they do to Read, and its errors
// match the same targets with errors.Is: io.EOF at end of input,
// os.ErrDeadlineExceeded, net.ErrClosed, syscall.ECONNRESET. (An error from
// waiting is a *net.OpError whose Op is "raw-read".) It is meant for stream
// sockets: on a datagram socket an empty datagram would read as io.EOF.
type LazyReader interface {
	// ReadLazy waits for input, borrows a buffer from bufs (or keeps the
	// one it holds from its last call), reads into it and returns the
	// bytes read. Whenever it has to wait, it first returns the buffer it
	// holds to bufs. The bytes returned are valid until the next call of
	// ReadLazy or ReleaseBuffer.
	ReadLazy(bufs *Buffers) ([]byte, error)
	// ReleaseBuffer returns the buffer ReadLazy holds, if any, to its
	// pool. Call it after the last ReadLazy, once the bytes it returned
	// are no longer used.
	ReleaseBuffer()
}
