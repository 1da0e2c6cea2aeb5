package loop

import (
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
// what it promises and costs. The accepting loop makes each accepted
// socket a net.Conn of the runtime's poller (net.FileConn); a goroutine of
// its own runs the prelude on it, with its deadline PreludeTimeout ahead,
// in serverState.preluding meanwhile (Shutdown and Close cut it short, and
// wait for it); then a duplicate of the socket goes to a serving loop, with
// the addresses of the connection the prelude returned.

// past is a deadline in the past: it cuts a prelude short.
var past = time.Unix(1, 0)

// startPrelude starts Config.Prelude on the connection the accepting loop
// l accepted as fd from sa on a. It owns fd from now on.
func (l *eventLoop) startPrelude(fd int32, sa syscall.Sockaddr, a *acceptor) {
	st := l.s
	f := os.NewFile(uintptr(fd), "")
	c, err := net.FileConn(f) // a duplicate
	f.Close()
	if err != nil {
		st.log.Error("sockfsm/loop: cannot run Config.Prelude; connection closed", "err", err)
		st.freeSlot()
		return
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
		st.freeSlot()
		return
	}
	st.preluding[c] = struct{}{}
	st.mu.Unlock()
	go st.prelude(c, sa, a)
}

// prelude is the goroutine of startPrelude: it runs the prelude on c and
// hands the socket to a serving loop, or refuses it.
func (st *serverState) prelude(c net.Conn, sa syscall.Sockaddr, a *acceptor) {
	defer st.preludeDone(c)
	nc, err := st.cfg.RunPrelude(c)
	fd := int32(-1)
	if err == nil {
		fd, err = socketOf(c, nc)
	}
	c.Close() // the socket lives on in fd, if it was taken
	if err != nil {
		st.mu.Lock()
		cut := st.closing
		st.mu.Unlock()
		if !cut {
			admit.Refuse(st.log, st.cfg.OnRefuse, c.RemoteAddr(), err)
		}
		st.freeSlot()
		return
	}
	info := sockfsm.ConnInfo{ID: connIDs.Add(1), LocalAddr: nc.LocalAddr(), RemoteAddr: nc.RemoteAddr()}
	key, counted := admit.Key(info.RemoteAddr)
	counted = counted && st.perIP != nil
	if counted && !st.perIP.Acquire(key) {
		unix.Close(int(fd)) // as at accept: nothing of the peer's data was read
		admit.Refuse(st.log, st.cfg.OnRefuse, info.RemoteAddr, sockfsm.ErrTooManyConnsFromIP)
		st.freeSlot()
		return
	}
	cn := &conn{fd: fd}
	cn.remoteAddr(sa, a) // the socket's own peer: it says whether it is TCP (see fCleanFIN)
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

// socketOf returns a new descriptor of the socket of c, the connection a
// prelude was given, if nc, the connection it returned, is c or a
// sockfsm.Readdressed of c; any other connection is refused with
// ErrPrelude, since what it buffered or transformed would not reach the
// handler.
func socketOf(c, nc net.Conn) (int32, error) {
	if nc != c {
		if r, ok := nc.(sockfsm.Readdressed); !ok || r.Base() != c {
			return -1, fmt.Errorf("%w: the loop driver serves the socket itself, and Prelude returned a %T, neither the connection it was given nor a sockfsm.Readdressed of it", sockfsm.ErrPrelude, nc)
		}
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("%w: a %T has no descriptor", sockfsm.ErrPrelude, c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl", derr)
	}
	return int32(fd), nil
}
