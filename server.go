package sockfsm

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/internal/admit"
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
	ipKeys    map[*driver]netip.Addr // the address perIP counts a connection under, if it does
	perIP     *admit.Limiter         // MaxConnsPerIP; nil when unlimited
	preluding map[net.Conn]struct{}  // in Config.Prelude: cut short by stopLocked
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
	s.ipKeys = map[*driver]netip.Addr{}
	s.perIP = admit.New(s.Config.MaxConnsPerIP)
	s.preluding = map[net.Conn]struct{}{}
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

// serve starts serving one accepted connection: at once, on the accepting
// goroutine, or, with a Config.Prelude, once the prelude is done on a
// goroutine of its own, so that a slow peer delays no accept.
func (s *Server) serve(c net.Conn, lim limits, log *slog.Logger) {
	if s.Config.Prelude == nil {
		s.admit(c, lim, log)
		return
	}
	s.startPrelude(c, log, nil, func(nc net.Conn) { s.admit(nc, lim, log) })
}

// startPrelude runs Config.Prelude on c on a goroutine of its own, then
// calls then with the connection to serve, or refuses c. Like an accept,
// the connection is counted in s.accepting until then takes it over. A
// prelude that fails once stop is closed, or the server is closing, was
// cut short (stopLocked, Listener.Close): it is not a refusal.
func (s *Server) startPrelude(c net.Conn, log *slog.Logger, stop <-chan struct{}, then func(net.Conn)) {
	timeout := s.Config.PreludeTimeout
	if timeout == 0 {
		timeout = DefaultPreludeTimeout
	}
	// Armed before the connection is registered, so that stopLocked's
	// deadline in the past, set under mu, comes after it.
	c.SetDeadline(time.Now().Add(timeout))
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		c.Close()
		s.doneAccepting()
		s.release()
		return
	}
	s.preluding[c] = struct{}{}
	s.mu.Unlock()
	go s.prelude(c, log, stop, then)
}

// prelude is the goroutine of startPrelude.
func (s *Server) prelude(c net.Conn, log *slog.Logger, stop <-chan struct{}, then func(net.Conn)) {
	nc, err := s.Config.RunPrelude(c)
	s.mu.Lock()
	delete(s.preluding, c)
	cut := s.closing
	s.mu.Unlock()
	select {
	case <-stop:
		cut = true
	default:
	}
	if err != nil {
		c.Close()
		if !cut {
			s.refuse(c.RemoteAddr(), err, log)
		}
		s.doneAccepting()
		s.release()
		return
	}
	c.SetDeadline(time.Time{})
	then(nc)
}

// cutPreludesLocked moves the deadline of every connection in its prelude
// into the past: the preludes fail now.
func (s *Server) cutPreludesLocked() {
	for c := range s.preluding {
		c.SetDeadline(past)
	}
}

// admit serves c unless its source address is at MaxConnsPerIP.
func (s *Server) admit(c net.Conn, lim limits, log *slog.Logger) {
	key, ok := s.admitIP(c, log)
	if !ok {
		s.doneAccepting()
		s.release()
		return
	}
	t, err := transport.Wrap(c)
	if err != nil {
		log.Error("cannot serve connection", "err", err)
		c.Close()
		s.releaseIP(key)
		s.doneAccepting()
		s.release()
		return
	}
	info := ConnInfo{ID: connIDs.Add(1), LocalAddr: c.LocalAddr(), RemoteAddr: c.RemoteAddr()}
	h, err := s.newHandler(info)
	if err != nil {
		connLogger(log, info).Error("NewHandler failed; connection aborted", "err", err)
		t.Abort()
		s.releaseIP(key)
		s.doneAccepting()
		s.release()
		return
	}
	s.start(t, lim, h, info, key)
}

// admitIP counts c under its source address for MaxConnsPerIP. At the
// limit it closes c, refuses it and returns false. The address returned is
// what releaseIP must be given when the connection ends; it is the zero
// Addr when nothing was counted.
func (s *Server) admitIP(c net.Conn, log *slog.Logger) (netip.Addr, bool) {
	if s.perIP == nil {
		return netip.Addr{}, true
	}
	key, ok := admit.Key(c.RemoteAddr())
	if !ok {
		return netip.Addr{}, true // not an IP address: not limited
	}
	if !s.perIP.Acquire(key) {
		c.Close() // nothing was read: a plain close, FIN
		s.refuse(c.RemoteAddr(), ErrTooManyConnsFromIP, log)
		return netip.Addr{}, false
	}
	return key, true
}

// releaseIP releases what admitIP counted.
func (s *Server) releaseIP(key netip.Addr) {
	if key.IsValid() {
		s.perIP.Release(key)
	}
}

// refuse logs a refused connection once, at warn level, and reports it to
// Config.OnRefuse.
func (s *Server) refuse(remote net.Addr, reason error, log *slog.Logger) {
	admit.Refuse(log, s.Config.OnRefuse, remote, reason)
}

// start registers a connection the Serve loop or Listener.Accept accepted
// and starts its goroutine; it returns the connection's engine. key is the
// address MaxConnsPerIP counted it under, released when it ends.
func (s *Server) start(t Transport, lim limits, h Handler, info ConnInfo, key netip.Addr) *Engine {
	d := &driver{}
	d.init(t, lim, h, info, &s.Config, time.Now)

	s.mu.Lock()
	s.accepting--
	s.conns[d] = struct{}{}
	if key.IsValid() {
		s.ipKeys[d] = key // only then: without MaxConnsPerIP a connection costs no more
	}
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
	key, counted := s.ipKeys[d]
	if counted {
		delete(s.ipKeys, d)
	}
	// Before the connection leaves NumConns: a client that saw it gone
	// may connect again at once.
	s.releaseIP(key)
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
	s.cutPreludesLocked() // closed uncounted: see startPrelude
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
