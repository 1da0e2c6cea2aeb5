package sockfsm

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/transport"
)

// Accept back-off bounds for temporary accept errors (EMFILE, ENFILE,
// ECONNABORTED, ...): the first wait, doubled on each consecutive error up to
// the maximum. net/http uses the same values.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// Server accepts connections and runs each one on the engine with a handler
// from NewHandler. Set its fields before the first call to Serve; do not
// copy it after.
type Server struct {
	// Config holds the connections' timeouts and limits and MaxConns.
	Config Config
	// NewHandler returns the handler of a new connection. It is called on
	// the accepting goroutine and must not block.
	NewHandler func(ConnInfo) Handler

	mu        sync.Mutex
	inited    bool
	sem       chan struct{}              // MaxConns slots; nil when unlimited
	done      chan struct{}              // closed when shutting down
	listeners map[*net.Listener]struct{} // by address: a listener need not be comparable
	conns     map[*driver]struct{}
	// accepting counts the Serve loops between calling Accept and
	// registering what it returned: a connection there is not in conns
	// yet, but Shutdown and Close must wait for it all the same.
	accepting int
	waiters   []chan struct{} // closed when conns is empty and accepting is 0
	closing   bool            // Shutdown or Close was called
	killing   bool            // connections are being aborted
	aborted   int             // connections that ended with ReasonShutdownDeadline
}

func (s *Server) initLocked() {
	if s.inited {
		return
	}
	s.inited = true
	if s.Config.MaxConns > 0 {
		s.sem = make(chan struct{}, s.Config.MaxConns)
	}
	s.done = make(chan struct{})
	s.listeners = map[*net.Listener]struct{}{}
	s.conns = map[*driver]struct{}{}
}

func (s *Server) logger() *slog.Logger {
	if s.Config.Logger != nil {
		return s.Config.Logger
	}
	return slog.Default()
}

// ListenAndServe listens on the TCP address addr and calls Serve.
func (s *Server) ListenAndServe(addr string) error {
	if err := s.Config.Validate(); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln and serves each on its own goroutine. It
// returns ErrServerClosed after Shutdown or Close, and closes ln. At
// MaxConns open connections it stops accepting until one closes. Temporary
// accept errors are retried after a back-off from 5 ms doubling to 1 s.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.Config.Validate(); err != nil {
		ln.Close()
		return err
	}
	if s.NewHandler == nil {
		ln.Close()
		return ErrNoHandler
	}
	s.mu.Lock()
	s.initLocked()
	if s.closing {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[&ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, &ln)
		s.mu.Unlock()
		ln.Close()
	}()

	lim := s.Config.limits()
	log := s.logger()
	var backoff time.Duration
	for {
		if s.sem != nil && !s.acquire(nil) {
			return ErrServerClosed
		}
		s.mu.Lock()
		s.accepting++
		s.mu.Unlock()
		c, err := ln.Accept()
		if err != nil {
			s.doneAccepting()
			s.release()
			select {
			case <-s.done:
				return ErrServerClosed
			default:
			}
			s.acceptError(err)
			if !temporary(err) {
				return err
			}
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			log.Warn("accept error; retrying", "err", err, "backoff", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		s.serve(c, lim, log)
	}
}

// acquire takes one of the MaxConns slots, waiting while all are taken, and
// reports whether it got one: it gives up when the server begins to shut
// down, or when stop (nil for none) is closed. A wait is reported to
// Config.OnMaxConnsWait when it ends.
func (s *Server) acquire(stop <-chan struct{}) bool {
	select {
	case s.sem <- struct{}{}:
		return true
	default:
	}
	began := time.Now()
	ok := false
	select {
	case s.sem <- struct{}{}:
		ok = true
	case <-s.done:
	case <-stop:
	}
	if f := s.Config.OnMaxConnsWait; f != nil {
		s.callHook("OnMaxConnsWait", func() { f(time.Since(began)) })
	}
	return ok
}

// acceptError reports an accept error to Config.OnAcceptError.
func (s *Server) acceptError(err error) {
	if f := s.Config.OnAcceptError; f != nil {
		s.callHook("OnAcceptError", func() { f(err) })
	}
}

// callHook calls one of the accepting goroutine's hooks; a panic there is
// logged, so that it does not take the accept loop down.
func (s *Server) callHook(name string, f func()) {
	defer func() {
		if r := recover(); r != nil {
			s.logger().Error("panic in Config."+name, "panic", r, "stack", string(debug.Stack()))
		}
	}()
	f()
}

// doneAccepting ends an accept that registered no connection.
func (s *Server) doneAccepting() {
	s.mu.Lock()
	s.accepting--
	s.notifyLocked()
	s.mu.Unlock()
}

// notifyLocked wakes the waiters of drainedLocked if nothing is open.
func (s *Server) notifyLocked() {
	if len(s.conns) == 0 && s.accepting == 0 {
		for _, w := range s.waiters {
			close(w)
		}
		s.waiters = nil
	}
}

func (s *Server) release() {
	if s.sem != nil {
		<-s.sem
	}
}

// temporaryAcceptErrors are the accept errors worth retrying: running out of
// descriptors or memory, a connection that died in the backlog, and the
// pending network errors Linux's accept(2) says to treat like EAGAIN.
var temporaryAcceptErrors = append(platformAcceptErrors, []syscall.Errno{
	syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.EINTR,
	syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EPROTO,
	syscall.ENETDOWN, syscall.ENOPROTOOPT, syscall.EHOSTDOWN, syscall.EHOSTUNREACH, syscall.EOPNOTSUPP, syscall.ENETUNREACH,
}...)

// temporary reports whether an accept error is worth retrying.
func temporary(err error) bool {
	for _, errno := range temporaryAcceptErrors {
		if errors.Is(err, errno) {
			return true
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	// A wrapping listener may say so itself.
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// serve starts the goroutine of one accepted connection.
func (s *Server) serve(c net.Conn, lim limits, log *slog.Logger) {
	t, err := transport.Wrap(c)
	if err != nil {
		log.Error("cannot serve connection", "err", err)
		c.Close()
		s.doneAccepting()
		s.release()
		return
	}
	info := ConnInfo{ID: connIDs.Add(1), LocalAddr: c.LocalAddr(), RemoteAddr: c.RemoteAddr()}
	h, err := s.newHandler(info)
	if err != nil {
		connLogger(log, info).Error("NewHandler failed; connection aborted", "err", err)
		t.Abort()
		s.doneAccepting()
		s.release()
		return
	}
	s.start(t, lim, h, info)
}

// start registers a connection the Serve loop or Listener.Accept accepted
// and starts its goroutine; it returns the connection's engine.
func (s *Server) start(t Transport, lim limits, h Handler, info ConnInfo) *Engine {
	d := &driver{}
	d.init(t, lim, h, info, &s.Config, time.Now)

	s.mu.Lock()
	s.accepting--
	s.conns[d] = struct{}{}
	if s.closing {
		d.e.Close()
	}
	if s.killing {
		d.e.Abort(ErrShutdownDeadline)
	}
	s.mu.Unlock()

	go s.runConn(d)
	return &d.e
}

// runConn is the goroutine of one connection.
//
// Its frame is under every other frame of the connection's goroutine, for
// the connection's whole life, so it does no more than call run, and the
// rest is in connDone (see driver.run on stack depth).
func (s *Server) runConn(d *driver) {
	d.run()
	s.connDone(d)
}

// connDone forgets a connection that ended (the engine logged how).
//
//go:noinline
func (s *Server) connDone(d *driver) {
	s.mu.Lock()
	if d.result.Reason == ReasonShutdownDeadline {
		s.aborted++
	}
	delete(s.conns, d)
	s.notifyLocked()
	s.mu.Unlock()
	s.release()
}

func (s *Server) newHandler(info ConnInfo) (h Handler, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &PanicError{Value: r}
		}
	}()
	h = s.NewHandler(info)
	if h == nil {
		return nil, ErrNoHandler
	}
	return h, nil
}

// stopLocked stops accepting: it marks the server closing and closes its
// listeners.
func (s *Server) stopLocked() {
	s.initLocked()
	if !s.closing {
		s.closing = true
		close(s.done)
	}
	for ln := range s.listeners {
		(*ln).Close()
	}
}

// drained returns a channel closed when no connection is open.
func (s *Server) drainedLocked() <-chan struct{} {
	ch := make(chan struct{})
	if len(s.conns) == 0 && s.accepting == 0 {
		close(ch)
	} else {
		s.waiters = append(s.waiters, ch)
	}
	return ch
}

func (s *Server) abortAll() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killing = true
	for d := range s.conns {
		d.e.Abort(ErrShutdownDeadline)
	}
	return s.drainedLocked()
}

// Shutdown stops the server gracefully. It stops accepting at once, asks
// idle connections to half-close, and lets busy ones flush the output in
// flight before they half-close; every connection then lingers within its
// bounds and closes. If ctx ends first, Shutdown aborts (RST) whatever is
// left. Either way it returns only when every connection is closed: nil if
// all closed gracefully, ctx's error if it aborted some at the deadline,
// and ErrShutdownDeadline if a concurrent Close aborted them.
//
// Handlers run on the connections' goroutines; a handler that blocks
// forever holds Shutdown too.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.stopLocked()
	for d := range s.conns {
		d.e.Close()
	}
	drained := s.drainedLocked()
	abortedBefore := s.aborted
	s.mu.Unlock()

	select {
	case <-drained:
		s.mu.Lock()
		killed := s.aborted != abortedBefore
		s.mu.Unlock()
		if killed {
			return ErrShutdownDeadline // a concurrent Close aborted connections
		}
		return nil
	case <-ctx.Done():
	}
	<-s.abortAll()
	s.mu.Lock()
	killed := s.aborted != abortedBefore
	s.mu.Unlock()
	if !killed {
		return nil // every connection closed gracefully as the deadline came
	}
	return ctx.Err()
}

// Close stops accepting and aborts every connection at once (RST), and
// returns when they are closed. Prefer Shutdown.
func (s *Server) Close() error {
	s.mu.Lock()
	s.stopLocked()
	s.mu.Unlock()
	<-s.abortAll()
	return nil
}

// NumConns returns the number of open connections.
func (s *Server) NumConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}
