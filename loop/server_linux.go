package loop

import (
	"context"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/admit"
)

// serverState is a Server's event loops and bookkeeping.
type serverState struct {
	// newKernel makes each loop's kernel; nil means epoll. Tests set it
	// (see kernel).
	newKernel func() (kernel, error)

	mu         sync.Mutex
	inited     bool
	loops      []*eventLoop // made by the first Serve; never changed after: loops[0] accepts, the others serve
	serving    []*eventLoop // loops[1:]: the loops new connections go to
	listeners  map[*acceptor]net.Listener
	nacceptors int                   // acceptors not yet closed by their loop
	preluding  map[net.Conn]struct{} // connections in Config.Prelude (see prelude_linux.go)
	closing    bool                  // Shutdown or Close was called
	graceful   bool                  // Shutdown was called
	killing    bool                  // the connections are being aborted
	drained    chan struct{}
	isDrained  bool
	exitOnce   sync.Once
	loopsDone  sync.WaitGroup

	// Set by initLocked, read-only after.
	cfg      sockfsm.Config
	newH     func(sockfsm.ConnInfo) sockfsm.Handler
	log      *slog.Logger
	maxConns int64
	perIP    *admit.Limiter // MaxConnsPerIP; nil when unlimited

	closingFlag atomic.Bool  // closing, for connGone
	badPrelude  atomic.Bool  // a prelude's result was refused: see readdressed
	nconns      atomic.Int64 // open connections, from accept to close
	slots       atomic.Int64 // MaxConns slots taken (accepting, or open)
	paused      atomic.Int32 // acceptors paused at MaxConns
	aborted     atomic.Int64 // connections ended with ReasonShutdownDeadline
	rr          atomic.Uint32
}

// initLocked takes s's fields, once.
func (st *serverState) initLocked(s *Server) {
	if st.inited {
		return
	}
	st.inited = true
	st.cfg = s.Config
	st.newH = s.NewHandler
	st.log = s.Config.Logger
	if st.log == nil {
		st.log = slog.Default()
	}
	st.maxConns = int64(s.Config.MaxConns)
	st.perIP = admit.New(s.Config.MaxConnsPerIP)
	st.listeners = map[*acceptor]net.Listener{}
	st.preluding = map[net.Conn]struct{}{}
	st.drained = make(chan struct{})
}

// makeLoops makes the event loops, once: n that serve connections
// (runtime.GOMAXPROCS(0) if n is 0) and, first, one that accepts. The
// caller starts them.
func (st *serverState) makeLoops(n int) error {
	if st.loops != nil {
		return nil
	}
	if n == 0 {
		n = runtime.GOMAXPROCS(0)
	}
	n++ // the accepting loop
	newKernel := st.newKernel
	if newKernel == nil {
		newKernel = newEpollKernel
	}
	bufSize := st.cfg.ReadBufferSize
	if bufSize == 0 {
		bufSize = sockfsm.DefaultReadBufferSize
	}
	loops := make([]*eventLoop, n)
	for i := range loops {
		k, err := newKernel()
		if err != nil {
			for _, l := range loops[:i] {
				l.k.shutdown()
			}
			return err
		}
		loops[i] = newEventLoop(st, k, bufSize)
	}
	st.loops, st.serving = loops, loops[1:]
	return nil
}

// Serve accepts connections on ln and serves them on the event loops. It
// returns ErrServerClosed after Shutdown or Close, and closes ln. ln must be
// a *net.TCPListener or a *net.UnixListener: any other listener (TLS) is
// refused with an error matching ErrUnsupportedListener. At MaxConns open
// connections it stops accepting until one closes. Temporary accept errors
// (EMFILE, ENFILE, ...) are retried after a back-off from 5 ms doubling to
// 1 s. Serve may be called for several listeners; they share the loops.
// A loop accepts on a duplicate of ln's descriptor: closing ln yourself
// does not stop it; Shutdown and Close do.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.check(ln); err != nil {
		ln.Close()
		return err
	}
	a, err := newAcceptor(ln)
	if err != nil {
		ln.Close()
		return err
	}
	st := &s.impl
	st.mu.Lock()
	st.initLocked(s)
	if st.closing {
		st.mu.Unlock()
		unix.Close(int(a.fd))
		ln.Close()
		return sockfsm.ErrServerClosed
	}
	start := st.loops == nil
	if err := st.makeLoops(s.Loops); err != nil {
		st.mu.Unlock()
		unix.Close(int(a.fd))
		ln.Close()
		return err
	}
	if start {
		for _, l := range st.loops {
			st.loopsDone.Add(1)
			go l.run()
		}
	}
	st.nacceptors++
	st.listeners[a] = ln
	st.loops[0].postAcceptor(a)
	st.mu.Unlock()

	err = <-a.done
	st.mu.Lock()
	delete(st.listeners, a)
	st.mu.Unlock()
	ln.Close()
	return err
}

// newAcceptor duplicates ln's descriptor for a loop to accept on. The
// duplicate shares the listener's non-blocking mode.
func newAcceptor(ln net.Listener) (*acceptor, error) {
	rc, err := ln.(syscall.Conn).SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, &net.OpError{Op: "dup", Net: ln.Addr().Network(), Addr: ln.Addr(), Err: derr}
	}
	a := &acceptor{fd: int32(fd), done: make(chan error, 1)}
	switch addr := ln.Addr().(type) {
	case *net.TCPAddr:
		a.tcp = true
		if !addr.IP.IsUnspecified() && addr.IP != nil {
			a.laddr = addr
		}
	case *net.UnixAddr:
		a.laddr = addr
		a.uaddr = &net.UnixAddr{Name: "@", Net: addr.Net}
	}
	return a, nil
}

// reserve takes a MaxConns slot for a connection about to be accepted; it
// reports false at MaxConns.
func (st *serverState) reserve() bool {
	if st.maxConns == 0 {
		return true
	}
	if st.slots.Add(1) > st.maxConns {
		st.slots.Add(-1)
		return false
	}
	return true
}

// unreserve gives back a slot that got no connection.
func (st *serverState) unreserve() {
	if st.maxConns > 0 {
		st.slots.Add(-1)
	}
}

// belowMax reports whether a slot is free.
func (st *serverState) belowMax() bool { return st.maxConns == 0 || st.slots.Load() < st.maxConns }

// pick chooses the loop of a new connection: the serving loops,
// round-robin.
func (st *serverState) pick() *eventLoop {
	return st.serving[int(st.rr.Add(1)-1)%len(st.serving)]
}

// freeSlot gives back the MaxConns slot of a connection that ended, or
// of one whose prelude failed, off the accepting loop, and wakes a
// listener paused at MaxConns.
func (st *serverState) freeSlot() {
	if st.maxConns == 0 {
		return
	}
	st.slots.Add(-1)
	if st.paused.Load() > 0 {
		// To the loops that hold a listener (Serve's: the accepting
		// loop), which are the only ones that can be paused: a listener
		// is added (naccs) before it can pause.
		for _, l := range st.loops {
			if l.naccs.Load() > 0 {
				l.postCmd(cmdResume)
			}
		}
	}
}

// connGone counts a connection that ended.
func (st *serverState) connGone(r sockfsm.Reason) {
	if r == sockfsm.ReasonShutdownDeadline {
		st.aborted.Add(1) // before nconns: Shutdown reads it once drained
	}
	st.nconns.Add(-1)
	st.freeSlot()
	if st.closingFlag.Load() {
		st.checkDrained()
	}
}

// acceptorGone counts an acceptor its loop closed.
func (st *serverState) acceptorGone() {
	st.mu.Lock()
	st.nacceptors--
	st.checkDrainedLocked()
	st.mu.Unlock()
}

func (st *serverState) checkDrained() {
	st.mu.Lock()
	st.checkDrainedLocked()
	st.mu.Unlock()
}

// checkDrainedLocked closes drained once the server is closing and nothing
// is open: no listener (none can be added once closing) and so no new
// connection, no prelude, and no connection.
func (st *serverState) checkDrainedLocked() {
	if st.closing && !st.isDrained && st.nacceptors == 0 && len(st.preluding) == 0 && st.nconns.Load() == 0 {
		st.isDrained = true
		close(st.drained)
	}
}

// callHook calls one of the accepting loop's hooks; a panic there is
// logged, so that it does not take the loop down.
func (st *serverState) callHook(name string, f func()) {
	defer func() {
		if r := recover(); r != nil {
			st.log.Error("panic in Config."+name, "panic", r, "stack", string(debug.Stack()))
		}
	}()
	f()
}

func (st *serverState) newHandler(info sockfsm.ConnInfo) (h sockfsm.Handler, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &sockfsm.PanicError{Value: r}
		}
	}()
	h = st.newH(info)
	if h == nil {
		return nil, sockfsm.ErrNoHandler
	}
	return h, nil
}

// stopLocked marks the server closing, closes its listeners and tells the
// loops to stop accepting, and, if graceful, to close their connections
// gracefully.
func (st *serverState) stopLocked(s *Server, graceful bool) {
	st.initLocked(s)
	m := cmd(0)
	if !st.closing {
		st.closing = true
		st.closingFlag.Store(true)
		m |= cmdStop
	}
	if graceful && !st.graceful {
		st.graceful = true
		m |= cmdClose
	}
	if m != 0 {
		for _, l := range st.loops {
			l.postCmd(m)
		}
	}
	for _, ln := range st.listeners {
		ln.Close()
	}
	st.cutPreludesLocked()
}

// kill tells the loops to abort every connection.
func (st *serverState) kill() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.killing {
		st.killing = true
		for _, l := range st.loops {
			l.postCmd(cmdKill)
		}
	}
}

// finish waits for the server to drain, then ends the loops and waits for
// them to return.
func (st *serverState) finish() {
	<-st.drained
	st.exitOnce.Do(func() {
		st.mu.Lock()
		defer st.mu.Unlock()
		for _, l := range st.loops {
			l.postCmd(cmdExit)
		}
	})
	st.loopsDone.Wait()
}

// Shutdown stops the server gracefully, as sockfsm.Server.Shutdown does. It
// stops accepting at once, asks idle connections to half-close, and lets
// busy ones flush the output in flight before they half-close; every
// connection then lingers within its bounds and closes. If ctx ends first,
// Shutdown aborts (RST) whatever is left. Either way it returns only when
// every connection is closed and the loops have returned: nil if all
// closed gracefully, ctx's error if it aborted some at the deadline, and
// ErrShutdownDeadline if a concurrent Close aborted them.
//
// Handlers run on the loops; a handler that blocks forever holds Shutdown
// too.
func (s *Server) Shutdown(ctx context.Context) error {
	st := &s.impl
	st.mu.Lock()
	st.stopLocked(s, true)
	st.checkDrainedLocked()
	before := st.aborted.Load()
	st.mu.Unlock()

	select {
	case <-st.drained:
		st.finish()
		if st.aborted.Load() != before {
			return sockfsm.ErrShutdownDeadline // a concurrent Close aborted connections
		}
		return nil
	case <-ctx.Done():
	}
	st.kill()
	st.finish()
	if st.aborted.Load() == before {
		return nil // every connection closed gracefully as the deadline came
	}
	return ctx.Err()
}

// Close stops accepting and aborts every connection at once (RST), and
// returns when they are closed. Prefer Shutdown.
func (s *Server) Close() error {
	st := &s.impl
	st.mu.Lock()
	st.stopLocked(s, false)
	st.checkDrainedLocked()
	st.mu.Unlock()
	st.kill()
	st.finish()
	return nil
}

// NumConns returns the number of open connections.
func (s *Server) NumConns() int { return int(s.impl.nconns.Load()) }
