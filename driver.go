package sockfsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
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

// handshaker is a transport with a handshake to run first: TLS.
type handshaker interface{ Handshake() error }

// past is a deadline in the past, used to wake a blocked read or write.
var past = time.Unix(1, 0)

// driver runs one Engine over one Transport: the thin I/O loop around the
// pure engine. Other goroutines talk to it only through the two request
// flags and the transport's deadlines.
type driver struct {
	t    Transport
	e    Engine
	now  func() time.Time
	lazy transport.LazyReader // t, if it can wait for input without a buffer
	bufs *transport.Buffers   // read buffers, shared by the connections
	buf  *[]byte              // borrowed from bufs at init, if t is not lazy

	shutdownReq, abortReq   atomic.Bool
	shutdownDone, abortDone bool
	transportClosed         bool
	result                  CloseInfo // how the connection ended, once run returns

	// The deadlines armed on the transport, when known: see armReadDeadline.
	rdl, wdl           time.Time
	rdlKnown, wdlKnown bool
	tls                bool // the transport is TLS: see handshake

	clock time.Time // the clock's last reading: see run
	act   Action    // the engine's operation in progress
}

func (d *driver) init(t Transport, lim limits, h Handler, info ConnInfo, cfg *Config, log *slog.Logger, now func() time.Time) {
	// log is the base logger; the engine tags it with the connection's
	// id and address when it first logs.
	d.t = t
	d.now = now
	d.lazy, _ = t.(transport.LazyReader)
	// Type assertions are made here, on the accepting goroutine: a failed
	// one can take the runtime deep, and on the connection's goroutine it
	// would grow its stack for good (TestIdleConnectionStack).
	_, d.tls = t.(handshaker)
	d.bufs = readBuffers(lim.readBuf)
	if d.lazy == nil {
		d.buf = d.bufs.Get() // Read needs its buffer to wait
	}
	d.e.init(lim, h, info, cfg.OnStateChange, log)
	d.e.onClose = cfg.OnClose
}

// requestShutdown asks the loop for a graceful close, waking an idle read.
// Safe for concurrent use.
func (d *driver) requestShutdown() {
	d.shutdownReq.Store(true)
	d.t.SetReadDeadline(past)
}

// requestAbort asks the loop to abort, waking any blocked read or write.
// Safe for concurrent use.
func (d *driver) requestAbort() {
	d.abortReq.Store(true)
	d.t.SetReadDeadline(past)
	d.t.SetWriteDeadline(past)
}

// pending reports whether a request arrived that the loop has not applied.
func (d *driver) pending() bool {
	return (d.abortReq.Load() && !d.abortDone) || (d.shutdownReq.Load() && !d.shutdownDone)
}

func (d *driver) apply() {
	if d.abortReq.Load() && !d.abortDone {
		d.abortDone = true
		d.e.Abort(d.now())
	}
	if d.shutdownReq.Load() && !d.shutdownDone {
		d.shutdownDone = true
		d.e.Shutdown(d.now())
	}
}

// handshake runs a TLS handshake, if the transport has one, before the
// engine starts, bounded by the idle timeout (or, if that is off, the write
// timeout): tls.Conn would otherwise run it inside the first Read, Write or
// CloseWrite, and a write or a half-close has no read deadline to bound it.
func (d *driver) handshake() {
	if !d.tls {
		return
	}
	hs := d.t.(handshaker)
	timeout := d.e.lim.idle
	if timeout == 0 {
		timeout = d.e.lim.write
	}
	dl := d.now().Add(timeout)
	d.t.SetReadDeadline(dl)
	d.t.SetWriteDeadline(dl)
	if d.pending() {
		d.unstarted()
		return
	}
	if err := hs.Handshake(); err != nil {
		if d.pending() {
			d.unstarted() // the request interrupted the handshake
			return
		}
		d.e.handshakeFailed(d.now(), err)
	}
}

// unstarted ends a connection whose handshake a request interrupted or
// preempted: a shutdown closes it gracefully (it has read and written
// nothing), an abort aborts it.
func (d *driver) unstarted() {
	if d.abortReq.Load() {
		return // the loop applies the abort
	}
	d.shutdownDone = true
	d.e.closeUnstarted(d.now())
}

// deadlineSlack is how far a read deadline may move later without being
// re-armed: the armed one then fires a little early, the engine sees that
// its own deadline has not come, and the loop re-arms it exactly. A busy
// connection thus re-arms its read deadline about once per deadlineSlack
// instead of on every read. Write deadlines are never left early: an early
// write timeout would abort the connection.
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

// forgetDeadlines marks the armed deadlines unknown: a request's wake-up or
// an error may have changed or spent them.
func (d *driver) forgetDeadlines() { d.rdlKnown, d.wdlKnown = false, false }

// recoverPanic turns a panic that escaped the engine (from the
// OnStateChange hook, say) into an abort of the transport.
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
	perr := &PanicError{Value: r, Stack: stack}
	d.e.onChange = nil // it may be what panicked
	if d.e.State() != fsm.Closed {
		d.e.abort(ReasonHandlerPanic, perr)
	} else if !d.e.closed {
		d.e.reason, d.e.err = ReasonHandlerPanic, perr // aborted before its close was done
	}
	d.e.CloseDone(d.now(), nil) // tells the handler and Config.OnClose, if not yet told
	d.result = d.e.CloseInfo()
	d.releaseBuffer()
	d.e.logger().Error("panic in connection", "panic", r, "stack", string(stack))
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
			if d.pending() {
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
			if d.abortReq.Load() && !d.abortDone {
				continue
			}
			n, err := d.t.Write(d.act.Data)
			d.writeDone(n, err)
		case OpCloseWrite:
			d.closeWrite()
		case OpClose, OpAbort:
			d.close()
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
	d.handshake()
	d.clock = d.now()
	if d.e.State() == fsm.Accepted && !d.pending() {
		d.e.Start(d.clock) // OnOpen runs here
		d.clock = d.now()
	}
}

// next applies the requests that arrived, asks the engine for its next
// operation and keeps it in d.act.
//
// Requests are applied before each operation; a request that arrives after
// the operation's deadline is set is seen by pending() before the call
// blocks, and one that arrives later wakes it.
//
//go:noinline
func (d *driver) next() Op {
	if d.pending() {
		d.forgetDeadlines()
		d.apply()
		d.clock = d.now()
	}
	d.act = d.e.Next(d.clock)
	return d.act.Op
}

// readDone reports a read's result to the engine.
//
//go:noinline
func (d *driver) readDone(p []byte, err error) {
	d.clock = d.now()
	if err != nil {
		d.forgetDeadlines()
	}
	// Input that came with the wake-up is delivered before the request is
	// applied (in next): a request that arrived with EOF still gets its
	// answer.
	d.e.ReadDone(d.clock, p, err)
	if d.e.m.State() == fsm.Sending && !d.e.flushing {
		d.clock = d.now() // a flush starts after the handler ran (OnData or OnPeerClose)
	}
}

// writeDone reports a write's result to the engine.
//
//go:noinline
func (d *driver) writeDone(n int, err error) {
	d.clock = d.now()
	if err != nil {
		d.forgetDeadlines()
		if d.abortReq.Load() && !d.abortDone {
			d.apply()
		}
	}
	d.e.WriteDone(d.clock, n, err)
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
	if d.abortReq.Load() && !d.abortDone {
		return // next applies the abort
	}
	err := d.t.CloseWrite()
	if d.tls {
		d.forgetDeadlines() // tls.Conn's CloseWrite sets its own write deadline
	}
	d.clock = d.now()
	d.e.CloseWriteDone(d.clock, err)
}

// close closes or aborts the transport, once.
//
//go:noinline
func (d *driver) close() {
	var err error
	if !d.transportClosed || (mutating && d.e.mut&mutCloseTwice != 0) {
		d.transportClosed = true
		if d.act.Op == OpAbort {
			err = d.t.Abort()
		} else {
			err = d.t.Close()
		}
	}
	d.clock = d.now()
	d.e.CloseDone(d.clock, err)
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
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	d := &driver{}
	d.init(t, cfg.limits(), h, info, &cfg, log, time.Now)
	stop := context.AfterFunc(ctx, d.requestAbort)
	defer stop()
	d.run()
	logClose(&d.e, &d.result)
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

// logClose logs how a connection ended. A graceful close is logged only at
// debug level, so the connection's tagged logger is not even built for it
// unless that level is on.
func logClose(e *Engine, info *CloseInfo) {
	ctx := context.Background()
	switch {
	case errors.Is(info.Err, ErrHandlerPanic):
		var pe *PanicError
		errors.As(info.Err, &pe)
		stack := ""
		if pe != nil {
			stack = string(pe.Stack)
		}
		e.logger().Error("handler panic: connection aborted", "err", info.Err, "stack", stack)
	case info.Reason.Abortive():
		e.logger().LogAttrs(ctx, slog.LevelInfo, "connection aborted",
			slog.String("reason", info.Reason.String()), slog.Any("err", info.Err),
			slog.Int64("read", info.BytesRead), slog.Int64("written", info.BytesWritten))
	case e.base != nil && e.base.Enabled(ctx, slog.LevelDebug):
		e.logger().LogAttrs(ctx, slog.LevelDebug, "connection closed",
			slog.String("reason", info.Reason.String()), slog.String("linger", info.Linger.String()),
			slog.Int64("read", info.BytesRead), slog.Int64("written", info.BytesWritten),
			slog.Int64("discarded", info.Discarded), slog.Duration("duration", info.Duration))
	}
}
