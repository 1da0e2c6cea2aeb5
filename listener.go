package sockfsm

import (
	"context"
	"net"
	"sync"

	"github.com/sockfsm/sockfsm/transport"
)

// Listener is a net.Listener whose connections the engine drives: give it
// to net/http, gRPC or any server written against net.Listener, and each
// accepted connection (a *NetConn) gets the engine's lifecycle: a graceful
// Close that lingers instead of answering unread input with RST, bounded
// timeouts, and a Shutdown that returns only when every socket is closed.
// The connections are the same Engine, table, promises and CloseInfo as
// Server's; Config's hooks (OnAccept, OnStateChange, OnClose,
// OnAcceptError, OnMaxConnsWait, Logger) and MaxConns apply to them as they
// do to Server's.
//
// What Config's fields mean on this face:
//
//   - IdleTimeout: off unless set. The application owns idleness (net/http
//     has its own IdleTimeout and ReadTimeout), and a handler that computes
//     for minutes before it answers must not see its connection closed.
//     Set it to bound a connection on which nothing is read or written.
//   - MinRate, MinRateWindow: MinRate is off unless set, for the same
//     reason: the application owns its protocol, and a request of a few
//     bytes followed by minutes of computing is input below any rate. Set
//     it (a positive MinRate) to close peers that trickle.
//   - WriteTimeout (default 60s): bounds each flush to the peer, as on
//     Server: a peer that does not read its response is aborted.
//   - LingerTimeout, LingerTime, LingerBytes: bound the linger after the
//     application's Close, as on Server.
//   - MaxLifetime: as on Server (off by default).
//   - ReadBufferSize (default 16 KiB): how much input the engine reads
//     ahead of the application's Read; beyond it, it stops reading.
//   - MaxPendingOutput (default 1 MiB): how much a Write may queue before
//     it waits for the peer.
//   - MaxConns: Accept waits while that many connections are open.
//   - MaxConnsPerIP, OnRefuse: as on Server: Accept closes a connection
//     beyond the limit, refuses it and accepts the next.
//   - Prelude, PreludeTimeout: as on Server. Accept then takes its
//     connections from an accept loop of the Listener's own, on which
//     preludes run as on Server, each on a goroutine of its own; a
//     connection whose prelude is done waits for Accept, as one in the
//     kernel's backlog would, and Close closes those not yet taken.
//
// The application's own deadlines (SetDeadline and the like) are separate
// from these and behave as net.Conn's.
type Listener struct {
	ln  net.Listener
	srv Server
	lim limits
	err error // Config.Validate's

	closeOnce sync.Once
	closed    chan struct{} // Close was called

	// With a Prelude, the accept loop runs on a goroutine of its own
	// (acceptLoop), so that a prelude delays no accept, and hands Accept
	// the connections whose prelude is done.
	loopOnce sync.Once
	ready    chan accepted // unbuffered: a connection waits for Accept
	loopDone chan struct{} // closed when acceptLoop returned on an error
	loopErr  error         // that error, set before loopDone is closed
}

// accepted is what acceptLoop hands to Accept: a connection whose prelude
// is done, or the underlying listener's error.
type accepted struct {
	c   net.Conn
	err error
}

// NewListener returns a Listener that accepts from ln, with cfg for its
// connections. An invalid cfg makes Accept return the error, matching
// ErrInvalidConfig.
func NewListener(ln net.Listener, cfg Config) *Listener {
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = -1 // the application owns idleness: see Listener
	}
	if cfg.MinRate == 0 {
		cfg.MinRate = -1 // the application owns its protocol: see Listener
	}
	l := &Listener{ln: ln, lim: cfg.limits(), err: cfg.Validate(), closed: make(chan struct{})}
	if cfg.Prelude != nil {
		l.ready = make(chan accepted)
		l.loopDone = make(chan struct{})
	}
	l.srv.Config = cfg
	l.srv.mu.Lock()
	l.srv.initLocked()
	l.srv.listeners[&l.ln] = struct{}{}
	l.srv.mu.Unlock()
	return l
}

// Listen announces on the local network address, as net.Listen does, and
// returns a Listener for it.
func Listen(network, address string, cfg Config) (*Listener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, err
	}
	return NewListener(ln, cfg), nil
}

// Accept waits for and returns the next connection, a *NetConn. At
// MaxConns open connections it waits until one closes. After Close or
// Shutdown it returns an error matching net.ErrClosed. Other errors are
// the underlying listener's, for the caller's own back-off (net/http's
// Serve backs off on temporary ones).
func (l *Listener) Accept() (net.Conn, error) {
	if l.err != nil {
		return nil, l.err
	}
	if l.ready != nil {
		return l.acceptPreluded()
	}
	s := &l.srv
	for {
		if s.sem != nil && !s.acquire(l.closed) {
			return nil, l.closedError()
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			s.release()
			return nil, l.closedError()
		}
		s.accepting++
		s.mu.Unlock()
		c, err := l.ln.Accept()
		if err != nil {
			s.doneAccepting()
			s.release()
			select {
			case <-l.closed:
				return nil, l.closedError()
			case <-s.done:
				return nil, l.closedError()
			default:
			}
			s.acceptError(err)
			return nil, err
		}
		if nc := l.startConn(c); nc != nil {
			return nc, nil
		}
	}
}

// startConn starts serving c, an accepted connection counted in
// s.accepting and holding a MaxConns slot, and returns its NetConn; or it
// refuses c (MaxConnsPerIP) and returns nil.
func (l *Listener) startConn(c net.Conn) *NetConn {
	s := &l.srv
	key, ok := s.admitIP(c, s.logger())
	if !ok {
		s.doneAccepting()
		s.release()
		return nil
	}
	t, err := transport.Wrap(c)
	if err != nil {
		s.logger().Error("cannot serve connection", "err", err)
		c.Close()
		s.releaseIP(key)
		s.doneAccepting()
		s.release()
		return nil
	}
	info := ConnInfo{ID: connIDs.Add(1), LocalAddr: c.LocalAddr(), RemoteAddr: c.RemoteAddr()}
	nc := newNetConn(info, l.lim.readBuf)
	nc.c = s.start(t, l.lim, nc, info, key).Conn()
	return nc
}

// acceptPreluded is Accept with a Prelude: it takes the next connection
// whose prelude is done from acceptLoop, which it starts on first use.
func (l *Listener) acceptPreluded() (net.Conn, error) {
	l.loopOnce.Do(func() { go l.acceptLoop() })
	s := &l.srv
	for {
		select {
		case a := <-l.ready:
			if a.err != nil {
				return nil, a.err
			}
			if nc := l.startConn(a.c); nc != nil {
				return nc, nil
			}
		case <-l.loopDone:
			return nil, l.loopErr
		case <-l.closed:
			return nil, l.closedError()
		case <-s.done:
			return nil, l.closedError()
		}
	}
}

// acceptLoop accepts connections and runs the prelude of each on a
// goroutine of its own, which hands the connection to Accept when done.
// The underlying listener's errors are handed to Accept too, one at a
// time, so that the caller's back-off paces the loop; after one that is
// not temporary, the loop ends and Accept returns it from then on.
func (l *Listener) acceptLoop() {
	s := &l.srv
	log := s.logger()
	for {
		if s.sem != nil && !s.acquire(l.closed) {
			return
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			s.release()
			return
		}
		s.accepting++
		s.mu.Unlock()
		c, err := l.ln.Accept()
		if err != nil {
			s.doneAccepting()
			s.release()
			select {
			case <-l.closed:
				return
			case <-s.done:
				return
			default:
			}
			s.acceptError(err)
			select {
			case l.ready <- accepted{err: err}:
			case <-l.closed:
				return
			case <-s.done:
				return
			}
			if !temporary(err) {
				l.loopErr = err
				close(l.loopDone)
				return
			}
			continue
		}
		s.startPrelude(c, log, l.closed, l.deliver)
	}
}

// deliver hands a connection whose prelude is done to Accept, or closes it
// if the Listener is closed first.
func (l *Listener) deliver(c net.Conn) {
	s := &l.srv
	select {
	case l.ready <- accepted{c: c}:
		return
	case <-l.closed:
	case <-s.done:
	}
	c.Close()
	s.doneAccepting()
	s.release()
}

func (l *Listener) closedError() error {
	return &net.OpError{Op: "accept", Net: l.ln.Addr().Network(), Addr: l.ln.Addr(), Err: net.ErrClosed}
}

// Close stops accepting, as net.Listener's Close does: the connections
// already accepted carry on. Use Shutdown to close them too.
func (l *Listener) Close() error {
	err := error(&net.OpError{Op: "close", Net: l.ln.Addr().Network(), Addr: l.ln.Addr(), Err: net.ErrClosed})
	l.closeOnce.Do(func() {
		close(l.closed)
		err = l.ln.Close()
		l.srv.mu.Lock()
		l.srv.cutPreludesLocked() // closed uncounted, like those Accept has not taken yet
		l.srv.mu.Unlock()
	})
	return err
}

// Addr returns the listener's network address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Shutdown stops accepting and closes every connection gracefully: each
// flushes what the application wrote, sends our FIN, lingers within its
// bounds and closes; the application's further Writes fail. If ctx ends
// first, Shutdown aborts (RST) what is left. Either way it returns only
// when every socket is closed: nil if all closed gracefully, ctx's error
// otherwise. With net/http, call http.Server.Shutdown first, so that the
// responses in flight finish, then Listener.Shutdown for the lingers.
func (l *Listener) Shutdown(ctx context.Context) error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.srv.Shutdown(ctx)
}

// NumConns returns the number of open connections: accepted and not yet
// closed by the engine (a connection the application closed is still open
// while it lingers).
func (l *Listener) NumConns() int { return l.srv.NumConns() }
