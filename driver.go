package sockfsm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/transport"
)

// Transport is the connection the engine's driver consumes. Every adapter in
// github.com/sockfsm/sockfsm/transport satisfies it.
//
// Read must not keep p after it returns: read buffers are shared by the
// connections of the process (see Config.ReadBufferSize). A transport that
// is also a transport.LazyReader is read with ReadLazy instead.
//
// Deadline expiry must make Read and Write return an error matching
// os.ErrDeadlineExceeded; end of input must be io.EOF; the peer's reset
// should match syscall.ECONNRESET. SetReadDeadline and SetWriteDeadline may
// be called from another goroutine while Read or Write is blocked, and must
// then take effect on the blocked call (as they do on net.Conn).
type Transport interface {
	Read(p []byte) (int, error)
	Write(p []byte) (int, error)
	// CloseWrite shuts down the sending side: our FIN.
	CloseWrite() error
	// Close closes the connection gracefully.
	Close() error
	// Abort closes the connection with RST.
	Abort() error
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
	LocalAddr() net.Addr
	RemoteAddr() net.Addr
}

// waiter is a transport that waits itself, without reading, until its read
// deadline passes or a wake-up moves it into the past: one on a virtual
// clock (transport/sim). Other transports wait on the driver's channel.
type waiter interface{ Wait() error }

// handshaker is a transport with a handshake to run first: TLS.
type handshaker interface{ Handshake() error }

// past is a deadline in the past, used to wake a blocked read or write.
var past = time.Unix(1, 0)

// Classify says how an I/O operation on a net.Conn-like transport ended:
// nil is ResultOK, io.EOF is ResultEOF, an error matching
// os.ErrDeadlineExceeded is ResultTimeout, the peer's reset (ECONNRESET,
// ECONNABORTED, EPIPE, ENOTCONN) is ResultReset, anything else ResultError. Drivers
// use it to report results to the Engine.
func Classify(err error) Result {
	switch {
	case err == nil:
		return ResultOK
	case errors.Is(err, io.EOF):
		return ResultEOF
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ResultTimeout
	case isReset(err):
		return ResultReset
	}
	return ResultError
}

// isReset reports whether err is the peer's RST: ECONNRESET, ECONNABORTED,
// EPIPE, or ENOTCONN (shutdown(2) on a socket the peer has reset).
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ENOTCONN)
}

// driver runs one Engine over one Transport: the thin I/O loop around the
// pure engine, the goroutine-per-connection driver of Server and
// ServeConn. It uses only the Engine's exported API (TestDriverUsesPublicAPI
// checks it), as a driver of an embedder's own would.
type driver struct {
	t    Transport
	e    Engine // embedded: one allocation per connection, not two (Engine.Init)
	now  func() time.Time
	lazy transport.LazyReader // t, if it can wait for input without a buffer
	bufs *transport.Buffers   // read buffers, shared by the connections
	buf  *[]byte              // borrowed from bufs at init, if t is not lazy

	transportClosed bool
	result          CloseInfo // how the connection ended, once run returns

	// The deadlines armed on the transport, when known: see armReadDeadline.
	rdl, wdl           time.Time
	rdlKnown, wdlKnown bool
	tls                bool // the transport is TLS: see handshake
	handshakeTimeout   time.Duration
	log                *slog.Logger // Config.Logger, for a panic that escaped the engine

	wakeCh atomic.Pointer[chan struct{}] // OpWait's wake-up; made on the first wait
	waiter waiter                        // t, if it waits itself

	clock time.Time // the clock's last reading: see run
	act   Action    // the engine's operation in progress
}

// init prepares d to run t with h. cfg must be valid and h not nil: the
// callers check both once, not per connection.
func (d *driver) init(t Transport, lim limits, h Handler, info ConnInfo, cfg *Config, now func() time.Time) {
	if err := d.e.Init(*cfg, h, info); err != nil {
		panic("sockfsm: driver.init: " + err.Error()) // the callers validated both
	}
	d.t = t
	d.log = cfg.Logger
	d.now = now
	d.lazy, _ = t.(transport.LazyReader)
	// Type assertions are made here, on the accepting goroutine: a failed
	// one can take the runtime deep, and on the connection's goroutine it
	// would grow its stack for good (TestIdleConnectionStack).
	_, d.tls = t.(handshaker)
	d.waiter, _ = t.(waiter)
	d.handshakeTimeout = lim.idle
	if d.handshakeTimeout == 0 {
		d.handshakeTimeout = lim.write
	}
	d.bufs = readBuffers(lim.readBuf)
	if d.lazy == nil {
		d.buf = d.bufs.Get() // Read needs its buffer to wait
	}
	d.e.SetWaker(d.wake)
}

// wake is the engine's waker: it interrupts the blocked operation op by
// moving its deadline into the past (a read's, a write's, both for a
// handshake), and ends a wait. Safe for concurrent use.
func (d *driver) wake(op Op) {
	switch op {
	case OpRead:
		d.t.SetReadDeadline(past)
	case OpWrite, OpCloseWrite:
		d.t.SetWriteDeadline(past)
	case OpWait:
		d.t.SetReadDeadline(past) // a transport that waits itself
		if ch := d.wakeCh.Load(); ch != nil {
			select {
			case *ch <- struct{}{}:
			default:
			}
		}
	default:
		d.t.SetReadDeadline(past)
		d.t.SetWriteDeadline(past)
	}
}

// handshake runs a TLS handshake, if the transport has one, before the
// engine starts, bounded by the idle timeout (or, if that is off, the write
// timeout): tls.Conn would otherwise run it inside the first Read, Write or
// CloseWrite, and a write or a half-close has no read deadline to bound it.
// It reports whether the engine may start.
func (d *driver) handshake() bool {
	if !d.tls {
		return true
	}
	d.e.Next(d.now()) // OpStart: a close or an abort now wakes the handshake
	dl := d.now().Add(d.handshakeTimeout)
	d.t.SetReadDeadline(dl)
	d.t.SetWriteDeadline(dl)
	d.forgetDeadlines()
	if d.e.Pending() {
		if !d.handleRequests() {
			return false // a close or an abort came before the handshake
		}
		d.e.Next(d.now()) // OpStart again: HandleTimeout ended the last one
	}
	if err := d.t.(handshaker).Handshake(); err != nil {
		if d.e.Pending() && !d.handleRequests() {
			return false // a close or an abort interrupted the handshake
		}
		d.e.Abort(errors.Join(ErrHandshake, err))
		d.e.HandleTimeout(d.now())
		return false
	}
	return true
}

// handleRequests applies pending requests and reports whether the engine
// is still in Accepted.
func (d *driver) handleRequests() bool {
	d.e.HandleTimeout(d.now())
	return d.e.State() == fsm.Accepted
}

// deadlineSlack is how far a read deadline may move later without being
// re-armed: the armed one then fires a little early, the engine sees that
// its own deadline has not come, and the loop re-arms it exactly. A busy
// connection thus re-arms its read deadline about once per deadlineSlack
// instead of on every read. Write deadlines are never left early: the
// engine resumes a write stopped early, but each stop costs a system call.
const deadlineSlack = 50 * time.Millisecond

// armReadDeadline reports whether the read deadline dl must be set on the
// transport, and if so records it as armed: the armed one will do if it is
// dl, or a little earlier than dl and not yet passed (see deadlineSlack).
// The caller sets it, from run: see there.
//
//go:noinline
func (d *driver) armReadDeadline(now, dl time.Time) bool {
	if d.rdlKnown {
		if dl.Equal(d.rdl) {
			return false
		}
		if !dl.IsZero() && !d.rdl.IsZero() && d.rdl.After(now) && dl.After(d.rdl) && dl.Sub(d.rdl) < deadlineSlack {
			return false
		}
	}
	d.rdl, d.rdlKnown = dl, true
	return true
}

// armWriteDeadline reports whether the write deadline dl must be set on the
// transport, and if so records it as armed.
//
//go:noinline
func (d *driver) armWriteDeadline(dl time.Time) bool {
	if d.wdlKnown && dl.Equal(d.wdl) {
		return false
	}
	d.wdl, d.wdlKnown = dl, true
	return true
}

// forgetDeadlines marks the armed deadlines unknown: a wake-up or an error
// may have changed or spent them.
func (d *driver) forgetDeadlines() { d.rdlKnown, d.wdlKnown = false, false }

// recoverPanic turns a panic that escaped the engine into an abort of the
// transport. The engine recovers the panics of the handler and the hooks
// itself, so one that reaches here is a bug of the engine or the driver:
// the transport is aborted so that no socket leaks, and the connection is
// reported with ReasonInternal.
func (d *driver) recoverPanic() {
	r := recover()
	if r == nil {
		return
	}
	stack := debug.Stack()
	if !d.transportClosed {
		d.transportClosed = true
		d.t.Abort()
	}
	d.result = CloseInfo{Reason: ReasonInternal, Err: &PanicError{Value: r, Stack: stack}}
	d.releaseBuffer()
	log := d.log
	if log == nil {
		log = slog.Default()
	}
	connLogger(log, d.e.Info()).Error("panic in connection driver", "panic", r, "stack", string(stack))
}

// run drives the engine until the connection is closed, and leaves how it
// ended in d.result. The clock is read once after each blocking call, and
// once more when a flush starts after the handler ran, so that the handler's
// time does not count against the write deadline.
//
// Stack depth matters here: a goroutine's stack starts at 2 KiB and, once
// grown to 4 KiB, stays so; that is a fifth of an idle connection's memory
// (TestIdleConnectionStack). So run's own frame is kept small, every step
// is a method of its own that is not inlined, and the calls that go deep
// into the runtime (Read, Write, and the deadline setters, which reach the
// timers and may wake the network poller) are made from run itself, with
// nothing between them and the goroutine's first frames.
func (d *driver) run() {
	defer d.recoverPanic()
	d.begin()
	for {
		switch d.next() {
		case OpRead:
			if d.armReadDeadline(d.clock, d.act.Deadline) {
				d.t.SetReadDeadline(d.act.Deadline)
			}
			// A TLS read may write (a KeyUpdate reply); a write deadline
			// left over from the last flush must not fail it.
			if d.tls && d.armWriteDeadline(d.act.Deadline) {
				d.t.SetWriteDeadline(d.act.Deadline)
			}
			if d.e.Pending() {
				d.handle()
				continue
			}
			if d.lazy != nil {
				p, err := d.lazy.ReadLazy(d.bufs)
				d.readDone(p, err)
			} else {
				n, err := d.t.Read(*d.buf)
				d.readDone((*d.buf)[:n:n], err) // capped: the buffer is shared
			}
		case OpWrite:
			if d.lazy != nil {
				// A write may block for as long as WriteTimeout on a peer
				// that does not read; it does so without a read buffer.
				d.lazy.ReleaseBuffer()
			}
			if d.armWriteDeadline(d.act.Deadline) {
				d.t.SetWriteDeadline(d.act.Deadline)
			}
			if d.e.Pending() {
				d.handle()
				continue
			}
			n, err := d.t.Write(d.act.Data)
			d.writeDone(n, err)
		case OpWait:
			d.wait()
		case OpCloseWrite:
			d.closeWrite()
		case OpClose, OpAbort:
			d.close()
		case OpStart:
			d.start()
		case OpDone:
			d.result = d.e.CloseInfo()
			d.releaseBuffer()
			return
		default:
			d.unknownOp()
		}
	}
}

//go:noinline
func (d *driver) unknownOp() {
	panic(fmt.Sprintf("sockfsm: engine returned unknown op %d", d.act.Op))
}

// begin runs the TLS handshake, if any, and starts the engine.
//
//go:noinline
func (d *driver) begin() {
	if d.handshake() {
		d.start()
	}
	d.clock = d.now()
}

//go:noinline
func (d *driver) start() {
	d.e.Start(d.now()) // OnOpen runs here
}

// next asks the engine for its next operation and keeps it in d.act. The
// clock is read again: the step before may have run the handler, and a
// flush that starts now must not count the handler's time.
//
//go:noinline
func (d *driver) next() Op {
	d.clock = d.now()
	d.act = d.e.Next(d.clock)
	return d.act.Op
}

// handle applies requests that arrived before the driver blocked.
//
//go:noinline
func (d *driver) handle() {
	d.forgetDeadlines() // a wake-up may have moved them
	d.clock = d.now()
	d.e.HandleTimeout(d.clock)
}

// wait blocks until the deadline or a wake-up: the handler paused reading.
//
//go:noinline
func (d *driver) wait() {
	if d.waiter != nil {
		d.forgetDeadlines()
		d.t.SetReadDeadline(d.act.Deadline)
		if !d.e.Pending() {
			d.waiter.Wait()
		}
		d.handle()
		return
	}
	ch := d.wakeCh.Load()
	if ch == nil {
		c := make(chan struct{}, 1)
		ch = &c
		d.wakeCh.Store(ch)
	}
	if !d.e.Pending() {
		var timeout <-chan time.Time
		if !d.act.Deadline.IsZero() {
			t := time.NewTimer(d.act.Deadline.Sub(d.now()))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-*ch:
		case <-timeout:
		}
	}
	d.handle()
}

// readDone reports a read's result to the engine.
//
//go:noinline
func (d *driver) readDone(p []byte, err error) {
	d.clock = d.now()
	r := ResultOK
	if err != nil {
		d.forgetDeadlines()
		r = Classify(err)
	}
	d.e.ReadDone(d.clock, p, r, err)
}

// writeDone reports a write's result to the engine.
//
//go:noinline
func (d *driver) writeDone(n int, err error) {
	d.clock = d.now()
	r := ResultOK
	if err != nil {
		d.forgetDeadlines()
		r = Classify(err)
	}
	d.e.WriteDone(d.clock, n, r, err)
}

// releaseBuffer returns the read buffer, once the transport is closed.
func (d *driver) releaseBuffer() {
	if d.lazy != nil {
		d.lazy.ReleaseBuffer()
	}
	d.bufs.Put(d.buf)
	d.buf = nil
}

// closeWrite half-closes the transport: our FIN.
//
//go:noinline
func (d *driver) closeWrite() {
	err := d.t.CloseWrite()
	if d.tls {
		d.forgetDeadlines() // tls.Conn's CloseWrite sets its own write deadline
	}
	d.clock = d.now()
	d.e.CloseWriteDone(d.clock, Classify(err), err)
}

// close closes or aborts the transport, once.
//
//go:noinline
func (d *driver) close() {
	if !d.transportClosed {
		d.transportClosed = true
		if d.act.Op == OpAbort {
			d.t.Abort()
		} else {
			d.t.Close()
		}
	}
	d.clock = d.now()
	d.e.CloseDone(d.clock)
}

// ServeConn runs the engine over t with handler h until the connection is
// closed, and returns how it ended. When ctx ends, the connection is aborted
// (ReasonShutdownDeadline). The transport is closed exactly once, by
// ServeConn. It returns an error only if cfg is invalid or h is nil, and
// then closes t.
func ServeConn(ctx context.Context, t Transport, h Handler, cfg Config) (CloseInfo, error) {
	if err := cfg.Validate(); err != nil {
		t.Close()
		return CloseInfo{}, err
	}
	if h == nil {
		t.Close()
		return CloseInfo{}, ErrNoHandler
	}
	info := ConnInfo{ID: connIDs.Add(1), LocalAddr: t.LocalAddr(), RemoteAddr: t.RemoteAddr()}
	d := &driver{}
	d.init(t, cfg.limits(), h, info, &cfg, time.Now)
	stop := context.AfterFunc(ctx, func() {
		d.e.Abort(errors.Join(ErrShutdownDeadline, context.Cause(ctx)))
	})
	defer stop()
	d.run()
	return d.result, nil
}

// defaultBuffers lends the read buffers of connections with the default
// ReadBufferSize; readBuffers, the others.
var (
	defaultBuffers = transport.NewBuffers(DefaultReadBufferSize)
	otherBuffers   sync.Map // int → *transport.Buffers
)

// readBuffers returns the process's pool of read buffers of size bytes,
// shared by every Server and ServeConn.
func readBuffers(size int) *transport.Buffers {
	if size == DefaultReadBufferSize {
		return defaultBuffers
	}
	if b, ok := otherBuffers.Load(size); ok {
		return b.(*transport.Buffers)
	}
	b, _ := otherBuffers.LoadOrStore(size, transport.NewBuffers(size))
	return b.(*transport.Buffers)
}

// connIDs numbers connections, across every Server and ServeConn of the
// process.
var connIDs atomic.Uint64

// connLogger tags log with the connection's id and remote address.
func connLogger(log *slog.Logger, info ConnInfo) *slog.Logger {
	remote := "unknown"
	if info.RemoteAddr != nil {
		remote = info.RemoteAddr.String()
	}
	return log.With(slog.Uint64("conn", info.ID), slog.String("remote", remote))
}
