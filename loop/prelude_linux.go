package loop

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/admit"
)

// Config.Prelude (the PROXY protocol) on the loop; the package doc says
// what it promises and costs. The accepting loop makes a duplicate of
// each accepted socket a net.Conn of the runtime's poller (net.FileConn);
// a goroutine of its own runs the prelude on it, with its deadline
// PreludeTimeout ahead, in serverState.preluding meanwhile (Shutdown and
// Close cut it short, and wait for it); then the descriptor accept4 gave,
// kept meanwhile, goes to a serving loop, with the addresses of the
// connection the prelude returned.

// past is a deadline in the past: it cuts a prelude short.
var past = time.Unix(1, 0)

// startPrelude starts Config.Prelude on the connection the accepting loop
// l accepted as fd from sa on a; it owns fd from then on. The prelude runs
// on a net.Conn of a duplicate of fd, and fd is kept for the loop that
// will serve the socket: so nothing needs a descriptor once the prelude
// is done. It reports false if it could not start, for want of a
// descriptor (EMFILE, ENFILE, ...): then a holds fd, with its MaxConns
// slot, and backs off, as for a failed accept, and accept hands fd back
// here when the back-off ends, so that the connection waits as one in the
// listen queue would.
func (l *eventLoop) startPrelude(fd int32, sa syscall.Sockaddr, a *acceptor) bool {
	st := l.s
	// net.FileConn takes a duplicate of its own; ours is given to it, so
	// that fd stays ours if it fails.
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	var c net.Conn
	if err != nil {
		err = os.NewSyscallError("fcntl", err)
	} else {
		f := os.NewFile(uintptr(dup), "")
		c, err = net.FileConn(f)
		f.Close()
	}
	if err != nil {
		var errno unix.Errno
		errors.As(err, &errno)
		switch errno {
		case unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM:
			a.holding, a.held, a.heldSA = true, fd, sa
			if f := st.cfg.OnAcceptError; f != nil {
				st.callHook("OnAcceptError", func() { f(err) })
			}
			l.backOff(a, err)
			return false
		default:
			st.log.Error("sockfsm/loop: cannot run Config.Prelude; connection closed", "err", err)
		}
		l.k.close(fd)
		st.freeSlot()
		return true
	}
	timeout := st.cfg.PreludeTimeout
	if timeout == 0 {
		timeout = sockfsm.DefaultPreludeTimeout
	}
	// Armed before the connection is registered, so that stopLocked's
	// deadline in the past, set under mu, comes after it.
	c.SetDeadline(time.Now().Add(timeout))
	st.mu.Lock()
	if st.closing {
		st.mu.Unlock()
		c.Close()
		l.k.close(fd)
		st.freeSlot()
		return true
	}
	st.preluding[c] = struct{}{}
	st.mu.Unlock()
	go st.prelude(c, fd, sa, a)
	return true
}

// prelude is the goroutine of startPrelude: it runs the prelude on c and
// hands the socket, fd, to a serving loop, or refuses it.
func (st *serverState) prelude(c net.Conn, fd int32, sa syscall.Sockaddr, a *acceptor) {
	defer st.preludeDone(c)
	cn := &conn{fd: fd}
	// The socket's own peer, from accept4: net.FileConn has none for a
	// peer gone already. It also says whether the socket is TCP (see
	// fCleanFIN).
	peer := cn.remoteAddr(sa, a)
	nc, err := st.cfg.RunPrelude(c)
	if err == nil {
		err = st.readdressed(c, nc)
	}
	c.Close() // the socket lives on in fd
	if err != nil {
		unix.Close(int(fd))
		st.mu.Lock()
		cut := st.closing
		st.mu.Unlock()
		if !cut {
			admit.Refuse(st.log, st.cfg.OnRefuse, peer, err)
		}
		st.freeSlot()
		return
	}
	info := sockfsm.ConnInfo{ID: connIDs.Add(1), LocalAddr: nc.LocalAddr(), RemoteAddr: nc.RemoteAddr()}
	if info.RemoteAddr == nil {
		info.RemoteAddr = peer
	}
	if info.LocalAddr == nil {
		info.LocalAddr = a.laddr
	}
	key, counted := admit.Key(info.RemoteAddr)
	counted = counted && st.perIP != nil
	if counted && !st.perIP.Acquire(key) {
		unix.Close(int(fd)) // as at accept: nothing of the peer's data was read
		admit.Refuse(st.log, st.cfg.OnRefuse, info.RemoteAddr, sockfsm.ErrTooManyConnsFromIP)
		st.freeSlot()
		return
	}
	target := st.pick()
	if err := st.initConn(cn, info, target); err != nil {
		st.log.Error("NewHandler failed; connection aborted", "conn", info.ID, "remote", addrString(info.RemoteAddr), "err", err)
		abortFD(fd)
		if counted {
			st.perIP.Release(key)
		}
		st.freeSlot()
		return
	}
	// TCP_NODELAY is on: net.FileConn set it. Counted before the prelude
	// is done, so that the server cannot be found drained in between.
	st.nconns.Add(1)
	target.postIncoming(cn)
}

// preludeDone forgets a connection whose prelude ended.
func (st *serverState) preludeDone(c net.Conn) {
	st.mu.Lock()
	delete(st.preluding, c)
	st.checkDrainedLocked()
	st.mu.Unlock()
}

// cutPreludesLocked moves the deadline of every connection in its prelude
// into the past: the preludes end now.
func (st *serverState) cutPreludesLocked() {
	for c := range st.preluding {
		c.SetDeadline(past)
	}
}

// maxReaddressed bounds a chain of sockfsm.Readdressed.
const maxReaddressed = 8

// readdressed checks that nc, what a prelude given c returned, is c, or a
// sockfsm.Readdressed of c (through a chain of them), whose socket the
// loop may serve; any other connection is refused with ErrPrelude, since
// what it buffered or transformed would not reach the handler. The first
// such refusal is also logged at Error: each connection will be refused
// alike.
func (st *serverState) readdressed(c, nc net.Conn) error {
	got := nc
	for range maxReaddressed {
		if nc == c {
			return nil
		}
		r, ok := nc.(sockfsm.Readdressed)
		if !ok {
			break
		}
		nc = r.Readdressed()
	}
	err := fmt.Errorf("%w: the loop driver serves the socket itself, and Config.Prelude returned a %T, neither the connection it was given nor a sockfsm.Readdressed of it", sockfsm.ErrPrelude, got)
	if st.badPrelude.CompareAndSwap(false, true) {
		st.log.Error("sockfsm/loop: Config.Prelude returned a connection the loop cannot serve: every connection it returns so is refused", "err", err)
	}
	return err
}
