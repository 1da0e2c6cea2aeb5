package loop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/admit"
)

// Tuning.
const (
	// maxEvents is how many events one epoll_wait returns at most.
	maxEvents = 256
	// stepBudget is how many engine steps a connection gets per turn of
	// its loop; one that still has work is queued for the next turn, so
	// that a peer that floods cannot keep the loop from the others.
	stepBudget = 32
	// acceptBudget is how many accept calls a turn makes at most per
	// listener (see accept).
	acceptBudget     = 64
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// The interest sets: connections are edge-triggered; EPOLLOUT is added once
// a write finds the socket full (see the package doc). EPOLLPRI is there
// for what it says of urgent data (see fCleanFIN); an edge with EPOLLPRI
// alone (only the urgent byte is unread, which a read skips) changes
// nothing.
const (
	interestRead  = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLPRI | unix.EPOLLET
	interestWrite = interestRead | unix.EPOLLOUT
)

// conn flags: what the loop knows of a connection's socket.
const (
	// fReadable: an edge said input, the peer's FIN or an error is there;
	// cleared by EAGAIN, or by a short read when no FIN is queued.
	fReadable uint16 = 1 << iota
	// fWritable: the last write did not find the socket full.
	fWritable
	// fPeerFIN: EPOLLRDHUP, EPOLLHUP or EPOLLERR came: read until zero or
	// an error, however short the reads (a zero that is known, fEOF, is
	// not read).
	fPeerFIN
	// fOutArmed: EPOLLOUT is in the interest set.
	fOutArmed
	// fFINSent: our FIN is out; EPOLLOUT must not stay armed.
	fFINSent
	// fQueued: in the loop's run queue.
	fQueued
	// fClosed: the descriptor is closed; the connection is gone from the
	// loop.
	fClosed
	// fGone: the server counted the connection's end.
	fGone
	// fCleanFIN: on a TCP connection, an edge said EPOLLRDHUP without
	// EPOLLHUP, EPOLLERR or EPOLLPRI: the peer's FIN was taken in order,
	// with no error, before our own, and no urgent mark is ahead of the
	// reads (Linux: tcp_fin sets RCV_SHUTDOWN and SOCK_DONE; tcp_poll
	// reports EPOLLPRI while urgent data is unread). Every byte the peer
	// sent is in the receive queue, tcp_recvmsg ends a read early only
	// when that is empty, and once it is empty a read returns zero,
	// whatever comes after (a reset included: SOCK_DONE is checked
	// first). MPTCP's reads check a reset first: there the EOF is what a
	// read made a moment earlier would have returned. One case escapes:
	// an urgent pointer the kernel has seen but whose byte has not come
	// (TCP_URG_NOTYET), which a misbehaving sender can leave inside data
	// already queued; tcp_poll does not report it, and only that sender's
	// own connection is cut short. Unix sockets never get the flag: a
	// read there also ends early at a message that carries descriptors.
	fCleanFIN
	// fEOF: a short read emptied the socket after fCleanFIN: the next
	// read would return zero, and is not made (see read).
	fEOF
	// fNagle: a TCP connection without TCP_NODELAY yet; it is set before
	// its second write (see noDelay).
	fNagle
	// fWrote: a write was made (with fNagle only).
	fWrote
)

// conn is one connection of a loop: its engine (by value: one allocation
// per connection, see sockfsm.Engine.Init), its descriptor, its timer and
// what the edges said. It holds no buffer and no goroutine. The remote
// address of a TCP connection lives here too, so that ConnInfo costs no
// allocation of its own. Its loop is not: only the waker needs it, and
// holds it.
//
// Mind its size (TestConnFootprint logs it): an object over 512 bytes
// with pointers carries an 8-byte header, so the conn costs its size plus
// 8, rounded up to the allocator's size class (..., 576, 640, 704, ...).
type conn struct {
	e     sockfsm.Engine
	raddr net.TCPAddr
	ip    [16]byte
	dl    int64 // the engine's deadline on the loop's clock; 0: none
	fd    int32
	ti    int32 // the timer heap's index of the connection's entry, plus one; 0: none
	flags uint16
	woken bool // in l.mail.woken; guarded by l.mu
}

// cmd is a command to a loop from the server.
type cmd uint8

const (
	cmdStop   cmd = 1 << iota // stop accepting
	cmdClose                  // close every connection gracefully
	cmdKill                   // abort every connection (ErrShutdownDeadline)
	cmdResume                 // a connection closed: resume accepting if paused at MaxConns
	cmdExit                   // the server is drained: return
)

// mailbox is what other goroutines hand a loop; guarded by eventLoop.mu.
type mailbox struct {
	woken     []*conn     // engines whose waker was called
	incoming  []*conn     // connections another loop accepted for this one
	acceptors []*acceptor // listeners to accept on
	cmds      cmd
}

// eventLoop is one event loop: a goroutine around epoll_wait.
type eventLoop struct {
	s       *serverState
	k       kernel
	wakefd  int32
	epoch   time.Time // the loop's clock reads nanoseconds since epoch
	buf     []byte    // the read buffer, shared by the loop's connections; made at its first connection (the accepting loop has none)
	bufSize int
	events  []unix.EpollEvent
	conns   []*conn // by descriptor
	n       int     // open connections
	timers  timerHeap
	runq    []*conn // connections with work left from their last turn
	spare   []*conn // the run queue's other slice
	accs    []*acceptor
	naccs   atomic.Int32 // len(accs), for other goroutines: see serverState.connGone

	stopped, closing, killing, exit bool
	acceptMore                      bool   // a listener had more than acceptBudget waiting
	turns                           uint64 // turns taken, for accept

	mu       sync.Mutex
	posted   bool // the eventfd was written and the loop has not read its mail yet
	shutdown bool // the loop has returned: posts are dropped
	mail     mailbox
	spareW   []*conn // mail.woken's other slice
	spareI   []*conn // mail.incoming's other slice
}

func newEventLoop(s *serverState, k kernel, bufSize int) *eventLoop {
	return &eventLoop{
		s:       s,
		k:       k,
		wakefd:  k.wakeFD(),
		epoch:   k.now(),
		bufSize: bufSize,
		events:  make([]unix.EpollEvent, maxEvents),
	}
}

// ns returns t on the loop's clock.
func (l *eventLoop) ns(t time.Time) int64 { return int64(t.Sub(l.epoch)) }

// run is the loop's goroutine.
func (l *eventLoop) run() {
	defer l.s.loopsDone.Done()
	for !l.exit {
		l.turn()
	}
	l.close()
}

// close releases the loop once it has returned.
func (l *eventLoop) close() {
	l.mu.Lock()
	l.shutdown = true
	l.mu.Unlock()
	// The server exits a loop once it is drained; anything left is a
	// bug, and its descriptors must not leak.
	for _, c := range l.conns {
		if c != nil {
			l.s.log.Error("sockfsm/loop: connection left at exit; aborted", "conn", c.e.Info().ID)
			l.closeFD(c, true)
			l.gone(c, sockfsm.ReasonInternal)
		}
	}
	for _, a := range slices.Clone(l.accs) {
		l.closeAcceptor(a, sockfsm.ErrServerClosed)
	}
	l.k.shutdown()
}

// turn is one turn of the loop: wait, then handle the events, the mail, the
// timers and the run queue.
func (l *eventLoop) turn() {
	l.turns++
	block, until := l.waitUntil()
	n, err := l.k.wait(l.events, block, until)
	if err != nil {
		if err != unix.EINTR {
			l.s.log.Error("sockfsm/loop: epoll_wait failed", "err", err)
		}
		n = 0
	}
	mail := false
	for i := range n {
		ev := &l.events[i]
		fd := ev.Fd
		if fd == l.wakefd {
			mail = true
			continue
		}
		if int(fd) < len(l.conns) {
			if c := l.conns[fd]; c != nil {
				l.ready(c, ev.Events)
				continue
			}
		}
		for _, a := range l.accs {
			if a.fd == fd {
				l.accept(a)
				break
			}
		}
	}
	if mail {
		l.readMail()
	}
	l.fireTimers()
	l.runQueue()
}

// waitUntil says whether the next wait may block, and until when (zero:
// no limit): until the first timer, and not at all if the run queue has
// work.
func (l *eventLoop) waitUntil() (bool, time.Time) {
	if len(l.runq) > 0 || l.acceptMore {
		l.acceptMore = false
		return false, time.Time{}
	}
	var at int64
	if len(l.timers) > 0 {
		at = l.timers[0].at
	}
	for _, a := range l.accs {
		if a.resumeAt != 0 && (at == 0 || a.resumeAt < at) {
			at = a.resumeAt
		}
	}
	if at == 0 {
		return true, time.Time{}
	}
	if at <= l.ns(l.k.now()) {
		return false, time.Time{} // due: this turn's fireTimers takes it
	}
	return true, l.epoch.Add(time.Duration(at))
}

// ready records what an edge says of c's socket and drives c.
func (l *eventLoop) ready(c *conn, ev uint32) {
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.flags |= fReadable
	}
	if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.flags |= fPeerFIN
		// Urgent data (EPOLLPRI) ends a read at its mark, short or not:
		// then a short read does not say the socket is empty.
		if ev&(unix.EPOLLHUP|unix.EPOLLERR|unix.EPOLLPRI) == 0 && c.raddr.IP != nil {
			c.flags |= fCleanFIN // a TCP connection's: see fCleanFIN
		}
	}
	if ev&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.flags |= fWritable
	}
	l.drive(c, false)
}

// ---- driving engines ----------------------------------------------------------

// drive runs c's engine until it must wait for its socket, its timer or a
// wake-up, or until its budget for this turn is spent. With handle, it
// first lets the engine handle what is due (its deadline passed, or its
// waker was called). A panic that escapes the engine (the engine recovers
// the handler's) aborts the connection, and the loop goes on.
func (l *eventLoop) drive(c *conn, handle bool) {
	defer l.recoverConn(c)
	if handle {
		c.e.HandleTimeout(l.k.now())
	}
	for range stepBudget {
		now := l.k.now()
		a := c.e.Next(now)
		switch a.Op {
		case sockfsm.OpRead, sockfsm.OpWait:
			l.arm(c, a.Deadline)
			// A request may have come before the deadline was armed:
			// see Engine.Pending.
			if c.e.Pending() {
				c.e.HandleTimeout(now)
				continue
			}
			if a.Op == sockfsm.OpWait || c.flags&fReadable == 0 || !l.read(c, now) {
				l.park(c)
				return
			}
		case sockfsm.OpWrite:
			l.arm(c, a.Deadline)
			if c.e.Pending() {
				c.e.HandleTimeout(now)
				continue
			}
			if c.flags&fWritable == 0 || !l.write(c, now, a.Data) {
				l.park(c)
				return
			}
		case sockfsm.OpCloseWrite:
			err := l.k.shutdownWrite(c.fd)
			c.flags |= fFINSent
			if err != nil {
				err = opError("shutdown", c, err)
			}
			c.e.CloseWriteDone(now, sockfsm.Classify(err), err)
		case sockfsm.OpClose, sockfsm.OpAbort:
			// The connection ends here, whatever is left of its budget.
			l.closeFD(c, a.Op == sockfsm.OpAbort)
			c.e.CloseDone(l.k.now())
			l.gone(c, c.e.CloseInfo().Reason)
			return
		case sockfsm.OpDone:
			return // gone at its close
		case sockfsm.OpStart:
			c.e.Start(now)
		default:
			panic(fmt.Sprintf("sockfsm/loop: the engine returned unknown op %d", a.Op))
		}
	}
	l.enqueue(c)
}

// read performs one read for OpRead and reports it. It returns false if
// the socket had nothing (EAGAIN): the connection waits for an edge.
//
// A read that would return zero is not made: after the peer's clean FIN
// (fCleanFIN), a short read emptied the receive queue, and Linux returns
// zero from then on. Its EOF is reported at once. It saves a system call
// on the connection whose request came with its FIN (the tutorial's
// client, and every half-closing one).
func (l *eventLoop) read(c *conn, now time.Time) bool {
	if c.flags&fEOF != 0 {
		c.e.ReadDone(now, nil, sockfsm.ResultEOF, io.EOF)
		return true
	}
	n, err := l.k.read(c.fd, l.buf)
	switch {
	case err == unix.EAGAIN:
		c.flags &^= fReadable
		return false
	case err == unix.EINTR:
	case err != nil:
		err = opError("read", c, err)
		c.e.ReadDone(now, nil, sockfsm.Classify(err), err)
	case n == 0:
		c.e.ReadDone(now, nil, sockfsm.ResultEOF, io.EOF)
	default:
		// A short read emptied the socket: the next input comes with an
		// edge of its own. Not so the FIN behind it, whose edge came.
		if n < len(l.buf) {
			switch {
			case c.flags&fCleanFIN != 0:
				c.flags |= fEOF
			case c.flags&fPeerFIN == 0:
				c.flags &^= fReadable
			}
		}
		c.e.ReadDone(now, l.buf[:n:n], sockfsm.ResultOK, nil) // capped: the buffer is the loop's
	}
	return true
}

// write performs one write of p for OpWrite and reports it. It returns
// false if the socket was full (EAGAIN): the connection waits for EPOLLOUT,
// armed now if it was not.
func (l *eventLoop) write(c *conn, now time.Time, p []byte) bool {
	l.beforeWrite(c)
	n, err := l.k.write(c.fd, p)
	switch {
	case err == unix.EAGAIN:
		c.flags &^= fWritable
		if c.flags&fOutArmed == 0 {
			// EPOLL_CTL_MOD reports the socket at once if it became
			// writable since the EAGAIN: no edge is lost.
			if err := l.k.ctl(unix.EPOLL_CTL_MOD, c.fd, interestWrite); err != nil {
				c.e.Abort(errors.Join(sockfsm.ErrIO, os.NewSyscallError("epoll_ctl", err)))
				return true
			}
			c.flags |= fOutArmed
		}
		return false
	case err == unix.EINTR:
	case err != nil:
		err = opError("write", c, err)
		c.e.WriteDone(now, 0, sockfsm.Classify(err), err)
	default:
		c.e.WriteDone(now, n, sockfsm.ResultOK, nil)
	}
	return true
}

// park leaves c waiting for an edge, its timer or its waker. After our FIN
// it takes EPOLLOUT out of the interest set.
func (l *eventLoop) park(c *conn) {
	if c.flags&(fFINSent|fOutArmed) == fFINSent|fOutArmed {
		c.flags &^= fOutArmed
		l.k.ctl(unix.EPOLL_CTL_MOD, c.fd, interestRead)
	}
}

// arm sets c's timer for the engine's deadline dl. A deadline later than
// the armed one leaves the heap alone: the entry fires early and is moved
// then (fireTimers).
func (l *eventLoop) arm(c *conn, dl time.Time) {
	if dl.IsZero() {
		c.dl = 0 // an armed entry fires and is dropped
		return
	}
	at := max(l.ns(dl), 1)
	c.dl = at
	if cur := l.timers.at(c); cur == 0 || cur > at {
		l.timers.set(c, at)
	}
}

// enqueue puts c in the run queue for the next turn.
func (l *eventLoop) enqueue(c *conn) {
	if c.flags&fQueued == 0 {
		c.flags |= fQueued
		l.runq = append(l.runq, c)
	}
}

// runQueue drives the connections whose budget ran out in the last turn.
func (l *eventLoop) runQueue() {
	if len(l.runq) == 0 {
		return
	}
	q := l.runq
	l.runq = l.spare[:0]
	for _, c := range q {
		c.flags &^= fQueued
		if c.flags&fClosed == 0 {
			l.drive(c, false)
		}
	}
	clear(q)
	l.spare = q
}

// fireTimers handles the timers that are due: a connection whose deadline
// has come is handled and driven; an entry armed earlier than its
// connection's deadline is moved to it.
func (l *eventLoop) fireTimers() {
	nowT := l.k.now()
	now := l.ns(nowT)
	// By index: rewatch may close a, which leaves l.accs.
	for i := 0; i < len(l.accs); i++ {
		a := l.accs[i]
		if a.resumeAt != 0 && a.resumeAt <= now {
			a.resumeAt = 0
			if !a.paused {
				l.rewatch(a)
				if i < len(l.accs) && l.accs[i] != a {
					i--
				}
			}
		}
	}
	// Bounded, so that an entry re-armed in the past waits for the next
	// turn.
	for budget := len(l.timers); budget > 0 && len(l.timers) > 0 && l.timers[0].at <= now; budget-- {
		c := l.timers[0].c
		switch {
		case c.dl == 0:
			l.timers.remove(c)
		case c.dl > now:
			l.timers.set(c, c.dl)
		default:
			l.timers.remove(c)
			l.drive(c, true)
		}
	}
}

// closeFD closes c's descriptor, gracefully or with RST, and forgets it.
func (l *eventLoop) closeFD(c *conn, abort bool) {
	if c.flags&fClosed != 0 {
		return
	}
	c.flags |= fClosed
	l.conns[c.fd] = nil
	l.n--
	l.timers.remove(c)
	if abort {
		l.k.abort(c.fd)
	} else {
		l.k.close(c.fd)
	}
}

// recoverConn turns a panic that escaped the engine into an abort of the
// connection's socket, so that no descriptor leaks and the loop goes on.
// The engine may have been left locked: it is not called again.
func (l *eventLoop) recoverConn(c *conn) {
	r := recover()
	if r == nil {
		return
	}
	l.s.log.Error("sockfsm/loop: panic in connection driver; connection aborted",
		"conn", c.e.Info().ID, "panic", r, "stack", string(debug.Stack()))
	l.closeFD(c, true)
	l.gone(c, sockfsm.ReasonInternal)
}

// gone counts the end of c, once, and releases what admitIP counted.
func (l *eventLoop) gone(c *conn, r sockfsm.Reason) {
	if c.flags&fGone == 0 {
		c.flags |= fGone
		if l.s.perIP != nil {
			if key, ok := admit.Key(c.e.Info().RemoteAddr); ok {
				l.s.perIP.Release(key)
			}
		}
		l.s.connGone(r)
	}
}

// opError wraps the errno of a failed operation on c as net does, for
// sockfsm.Classify and CloseInfo.Err.
func opError(op string, c *conn, errno error) error {
	info := c.e.Info()
	network := "tcp"
	if info.LocalAddr != nil {
		network = info.LocalAddr.Network()
	}
	return &net.OpError{Op: op, Net: network, Source: info.LocalAddr, Addr: info.RemoteAddr, Err: os.NewSyscallError(op, errno)}
}

// ---- mail ------------------------------------------------------------------------

// postWake queues c for its loop's next turn.
func (l *eventLoop) postWake(c *conn) {
	l.mu.Lock()
	if !c.woken {
		c.woken = true
		l.mail.woken = append(l.mail.woken, c)
	}
	l.postLocked()
}

// postIncoming hands l a connection another loop accepted.
func (l *eventLoop) postIncoming(c *conn) {
	l.mu.Lock()
	l.mail.incoming = append(l.mail.incoming, c)
	l.postLocked()
}

func (l *eventLoop) postAcceptor(a *acceptor) {
	l.mu.Lock()
	l.mail.acceptors = append(l.mail.acceptors, a)
	l.postLocked()
}

func (l *eventLoop) postCmd(m cmd) {
	l.mu.Lock()
	l.mail.cmds |= m
	l.postLocked()
}

// postLocked wakes the loop, unless it was woken already, and unlocks.
func (l *eventLoop) postLocked() {
	post := !l.posted && !l.shutdown
	l.posted = true
	l.mu.Unlock()
	if post {
		l.k.post()
	}
}

// readMail takes the loop's mail and acts on it. A post after it took the
// mail writes the eventfd again, which the next wait reports (see post).
func (l *eventLoop) readMail() {
	l.mu.Lock()
	m := l.mail
	l.mail = mailbox{woken: l.spareW[:0], incoming: l.spareI[:0]}
	for _, c := range m.woken {
		c.woken = false
	}
	l.posted = false
	l.mu.Unlock()

	for _, a := range m.acceptors {
		l.addAcceptor(a)
	}
	for _, c := range m.incoming {
		l.register(c)
	}
	if m.cmds&cmdStop != 0 {
		l.stop()
	}
	if m.cmds&cmdClose != 0 {
		l.closeAll()
	}
	if m.cmds&cmdKill != 0 {
		l.kill()
	}
	if m.cmds&cmdResume != 0 {
		l.resumeAccepting()
	}
	if m.cmds&cmdExit != 0 {
		l.exit = true
	}
	for _, c := range m.woken {
		if c.flags&fClosed == 0 {
			l.drive(c, true)
		}
	}
	clear(m.woken)
	clear(m.incoming)
	l.spareW, l.spareI = m.woken, m.incoming
}

// stop stops the loop's accepting.
func (l *eventLoop) stop() {
	l.stopped = true
	for _, a := range slices.Clone(l.accs) {
		l.closeAcceptor(a, sockfsm.ErrServerClosed)
	}
}

// closeAll asks each of the loop's connections to close gracefully
// (Engine.Close wakes it), and those handed to it later.
func (l *eventLoop) closeAll() {
	l.closing = true
	for _, c := range l.conns {
		if c != nil {
			c.e.Close()
		}
	}
}

// kill aborts every connection of the loop.
func (l *eventLoop) kill() {
	l.killing = true
	for _, c := range l.conns {
		if c != nil {
			c.e.Abort(sockfsm.ErrShutdownDeadline)
		}
	}
}

// register adds a connection to the loop, starts its engine and drives it.
func (l *eventLoop) register(c *conn) {
	if l.buf == nil {
		l.buf = make([]byte, l.bufSize)
	}
	if err := l.k.ctl(unix.EPOLL_CTL_ADD, c.fd, interestRead); err != nil {
		// It cannot be watched: it is aborted before it starts.
		c.e.Abort(errors.Join(sockfsm.ErrIO, os.NewSyscallError("epoll_ctl", err)))
	}
	if int(c.fd) >= len(l.conns) {
		n := max(int(c.fd)+1, 2*len(l.conns), 64)
		l.conns = append(l.conns, make([]*conn, n-len(l.conns))...)
	}
	l.conns[c.fd] = c
	l.n++
	c.flags |= fWritable
	if l.closing {
		c.e.Close()
	}
	if l.killing {
		c.e.Abort(sockfsm.ErrShutdownDeadline)
	}
	l.drive(c, false) // OpStart: Start runs OnOpen
}

// ---- accepting -------------------------------------------------------------------

// acceptor is a listener a loop accepts on.
type acceptor struct {
	fd    int32    // the loop's duplicate of the listener's descriptor
	tcp   bool     // TCP (else Unix)
	laddr net.Addr // ConnInfo.LocalAddr of every connection; nil: asked per connection (a wildcard address)
	uaddr net.Addr // the remote address of unnamed Unix peers: "@", as net has it
	done  chan error

	backoff  time.Duration
	resumeAt int64     // the back-off ends, on the loop's clock; 0: none
	paused   bool      // at MaxConns
	pausedAt time.Time // when it paused, for Config.OnMaxConnsWait
	watched  bool      // in the epoll set
	nodelay  uint8     // how its TCP connections get TCP_NODELAY; see noDelay
	batch    uint8     // the accept calls of the last turn that made them all; see accept
	fullAt   uint64    // that turn (eventLoop.turns); 0: none

	// A connection accepted for Config.Prelude that could not start for
	// want of a descriptor, with its MaxConns slot (see startPrelude).
	holding bool
	held    int32
	heldSA  syscall.Sockaddr
}

// acceptor.nodelay: below nodelayTries, how many accepted sockets were
// seen without TCP_NODELAY; see noDelay.
const (
	nodelayTries     = 8
	nodelayEach      = nodelayTries // it is set on each
	nodelayInherited = 255          // accepted sockets inherit it
)

func (l *eventLoop) addAcceptor(a *acceptor) {
	l.accs = append(l.accs, a)
	l.naccs.Add(1)
	if a.tcp && !l.k.listenNoDelay(a.fd) {
		a.nodelay = nodelayEach // see noDelay
	}
	if l.stopped {
		l.closeAcceptor(a, sockfsm.ErrServerClosed)
		return
	}
	l.watch(a)
}

func (l *eventLoop) watch(a *acceptor) {
	if a.watched {
		return
	}
	if err := l.k.ctl(unix.EPOLL_CTL_ADD, a.fd, unix.EPOLLIN); err != nil {
		l.closeAcceptor(a, os.NewSyscallError("epoll_ctl", err))
		return
	}
	a.watched = true
}

// rewatch watches a again after a back-off or a wait at MaxConns, and
// starts the connection it holds, if any (see startPrelude).
func (l *eventLoop) rewatch(a *acceptor) {
	l.watch(a)
	if a.holding {
		l.accept(a)
	}
}

func (l *eventLoop) unwatch(a *acceptor) {
	if a.watched {
		a.watched = false
		l.k.ctl(unix.EPOLL_CTL_DEL, a.fd, 0)
	}
}

// closeAcceptor stops accepting on a and ends its Serve with err.
func (l *eventLoop) closeAcceptor(a *acceptor, err error) {
	i := slices.Index(l.accs, a)
	if i < 0 {
		return
	}
	l.accs = slices.Delete(l.accs, i, i+1)
	l.naccs.Add(-1)
	l.unwatch(a)
	if a.paused {
		l.unpause(a) // a wait at MaxConns ends with the server's stop
	}
	if a.holding {
		l.k.close(a.held) // as the connections in the listen queue are
		a.holding = false
		l.s.freeSlot()
	}
	l.k.close(a.fd)
	a.done <- err
	l.s.acceptorGone()
}

// accept accepts what is waiting on a. The listener is level-triggered:
// while a connection waits in its queue, every wait reports it. So a turn
// need not accept until EAGAIN, which costs a failed accept4 per turn: it
// makes one accept4, as nginx does by default, unless the turn before
// also accepted on a and made all its calls: a queue is building, and the
// turn makes twice as many, up to acceptBudget. Connections that come one
// at a time cost one accept4 each; a burst of n, about log2(n) turns and
// one EAGAIN.
func (l *eventLoop) accept(a *acceptor) {
	s := l.s
	if a.holding {
		fd, sa := a.held, a.heldSA
		a.holding, a.heldSA = false, nil
		if !l.startPrelude(fd, sa, a) {
			return
		}
	}
	n := 1
	if a.fullAt != 0 && a.fullAt+1 == l.turns {
		n = min(2*int(a.batch), acceptBudget)
	}
	for range n {
		if !s.reserve() {
			l.pause(a)
			return
		}
		fd, sa, err := l.k.accept(a.fd)
		if err != nil {
			s.unreserve()
			switch {
			case err == unix.EAGAIN:
				return
			case err == unix.EINTR || err == unix.ECONNABORTED:
				continue // as net does: the next one
			}
			err = os.NewSyscallError("accept4", err)
			if f := s.cfg.OnAcceptError; f != nil {
				s.callHook("OnAcceptError", func() { f(err) })
			}
			if temporary(err) {
				l.backOff(a, err)
			} else {
				l.closeAcceptor(a, err)
			}
			return
		}
		a.backoff = 0
		if s.cfg.Prelude != nil {
			if !l.startPrelude(fd, sa, a) { // see prelude_linux.go
				return
			}
			continue
		}
		if !l.admitIP(fd, sa) {
			s.unreserve()
			continue
		}
		nagle := a.tcp && l.noDelay(a, fd) // not for a connection refused at once
		l.newConn(fd, sa, a, nagle)
	}
	a.batch, a.fullAt = uint8(n), l.turns
	if !s.belowMax() {
		// At MaxConns now: the listener leaves the epoll set at once, as
		// it would at the next call's reserve.
		l.pause(a)
		return
	}
	if n == acceptBudget {
		l.acceptMore = true
	}
}

// noDelay sees to Nagle's algorithm on a TCP connection accepted on a,
// which net turns off on every connection it accepts: it reports whether
// the connection must have TCP_NODELAY set before its second write
// (fNagle). Linux copies TCP_NODELAY from a plain TCP listener, which
// addAcceptor set it on, to the sockets it accepts afterwards: once one
// accepted socket is seen with it, the others cost no system call. Until
// then each is asked; after nodelayTries that were not, or for a listener
// whose children may not inherit it (MPTCP), none is asked.
//
// Setting it waits for the second write because until then Nagle's
// algorithm holds nothing back: it delays a small segment only while a
// small segment sent earlier is unacknowledged (Linux's tcp_nagle_check,
// with Minshall's rule, tcp_minshall_check), and on an accepted
// connection our first write is the first data we send. One exception: a
// first write larger than the peer's receive window, whose edge falls
// inside a segment, sends a piece smaller than a segment there, and that
// piece may hold back the write's own tail until it is acknowledged (with
// TCP_NODELAY the tail would go as soon as the window opens; the ACK that
// opens it usually acknowledges the piece too). Our FIN is never held
// (tcp_send_fin pushes with Nagle off). A connection that writes once, a
// request answered and closed, so costs no setsockopt at all; one that
// writes more pays the one net pays at its accept, and setting it pushes
// whatever the first write left queued.
func (l *eventLoop) noDelay(a *acceptor, fd int32) bool {
	switch {
	case a.nodelay == nodelayInherited:
		return false
	case a.nodelay < nodelayTries:
		if on, err := l.k.noDelay(fd); err == nil && on {
			a.nodelay = nodelayInherited
			return false
		}
		a.nodelay++
	}
	return true
}

// beforeWrite sets TCP_NODELAY on c before its second write if the
// accept left it to the writes (see noDelay).
func (l *eventLoop) beforeWrite(c *conn) {
	if c.flags&fNagle == 0 {
		return
	}
	if c.flags&fWrote == 0 {
		c.flags |= fWrote
		return
	}
	c.flags &^= fNagle | fWrote
	l.k.setNoDelay(c.fd)
}

// admitIP counts the connection accepted on fd under its source address
// for MaxConnsPerIP. At the limit it closes fd (nothing was read: a plain
// close, FIN), refuses the connection as sockfsm.Server does and returns
// false. The count is released when the connection is gone (see gone).
func (l *eventLoop) admitIP(fd int32, sa syscall.Sockaddr) bool {
	s := l.s
	if s.perIP == nil {
		return true
	}
	key, remote, ok := ipKey(sa)
	if !ok {
		return true // not an IP address: not limited
	}
	if s.perIP.Acquire(key) {
		return true
	}
	l.k.close(fd)
	admit.Refuse(s.log, s.cfg.OnRefuse, remote, sockfsm.ErrTooManyConnsFromIP)
	return false
}

// ipKey returns the MaxConnsPerIP key of the peer address sa, and the
// address; ok is false for a peer that has no IP address (Unix sockets).
func ipKey(sa syscall.Sockaddr) (key netip.Addr, remote net.Addr, ok bool) {
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrFrom4(sa.Addr), &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}, true
	case *syscall.SockaddrInet6:
		return netip.AddrFrom16(sa.Addr).Unmap(), &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port, Zone: zoneName(sa.ZoneId)}, true
	}
	return netip.Addr{}, nil, false
}

// temporaryAcceptErrors are the accept errors worth retrying after a
// back-off, as sockfsm.Server has them: running out of descriptors or
// memory, and the pending network errors accept(2) says to treat like
// EAGAIN.
var temporaryAcceptErrors = []unix.Errno{
	unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNRESET, unix.EPROTO,
	unix.ENETDOWN, unix.ENOPROTOOPT, unix.EHOSTDOWN, unix.EHOSTUNREACH, unix.EOPNOTSUPP, unix.ENETUNREACH,
}

func temporary(err error) bool {
	var errno unix.Errno
	return errors.As(err, &errno) && slices.Contains(temporaryAcceptErrors, errno)
}

// backOff stops accepting on a for a while: 5 ms, doubling on each
// consecutive error up to 1 s.
func (l *eventLoop) backOff(a *acceptor, err error) {
	a.backoff = min(max(2*a.backoff, acceptBackoffMin), acceptBackoffMax)
	l.s.log.Warn("accept error; retrying", "err", err, "backoff", a.backoff)
	a.resumeAt = l.ns(l.k.now().Add(a.backoff))
	l.unwatch(a)
}

// pause stops accepting on a at MaxConns until a connection closes.
func (l *eventLoop) pause(a *acceptor) {
	if a.paused {
		return
	}
	a.paused = true
	l.s.paused.Add(1)
	// A connection may have closed before paused was counted, and so
	// posted no cmdResume: then there is no wait.
	if l.s.belowMax() {
		a.paused = false
		l.s.paused.Add(-1)
		l.acceptMore = true // accept again in the next turn
		return
	}
	a.pausedAt = l.k.now()
	l.unwatch(a)
}

// unpause ends a's wait at MaxConns, and reports it to
// Config.OnMaxConnsWait.
func (l *eventLoop) unpause(a *acceptor) {
	a.paused = false
	l.s.paused.Add(-1)
	if f := l.s.cfg.OnMaxConnsWait; f != nil {
		wait := l.k.now().Sub(a.pausedAt)
		l.s.callHook("OnMaxConnsWait", func() { f(wait) })
	}
}

// resumeAccepting watches the loop's paused listeners again if the
// server is below MaxConns.
func (l *eventLoop) resumeAccepting() {
	// By index: rewatch may close a, which leaves l.accs.
	for i := 0; i < len(l.accs); i++ {
		a := l.accs[i]
		if a.paused && l.s.belowMax() {
			l.unpause(a)
			if a.resumeAt == 0 {
				l.rewatch(a)
				if i < len(l.accs) && l.accs[i] != a {
					i--
				}
			}
		}
	}
}

// newConn sets up the connection accepted on fd and hands it to a loop.
// With nagle, TCP_NODELAY is set before its second write (see noDelay).
func (l *eventLoop) newConn(fd int32, sa syscall.Sockaddr, a *acceptor, nagle bool) {
	s := l.s
	target := s.pick()
	c, info, err := l.makeConn(fd, sa, a, target)
	if err != nil {
		s.log.Error("NewHandler failed; connection aborted", "conn", info.ID, "remote", addrString(info.RemoteAddr), "err", err)
		l.k.abort(fd)
		if s.perIP != nil {
			// admitIP counted it; gone, which would release it, never
			// comes for a connection that was never registered.
			if key, _, ok := ipKey(sa); ok {
				s.perIP.Release(key)
			}
		}
		s.unreserve()
		return
	}
	s.nconns.Add(1)
	if nagle {
		c.flags = fNagle
	}
	if target == l {
		l.register(c)
	} else {
		target.postIncoming(c)
	}
}

// makeConn makes the connection accepted on fd for the loop target: its
// ConnInfo, its handler and its engine. The connection's memory is this
// one allocation and its waker's closure.
func (l *eventLoop) makeConn(fd int32, sa syscall.Sockaddr, a *acceptor, target *eventLoop) (*conn, sockfsm.ConnInfo, error) {
	c := &conn{fd: fd}
	info := sockfsm.ConnInfo{ID: connIDs.Add(1), LocalAddr: a.laddr, RemoteAddr: c.remoteAddr(sa, a)}
	if info.LocalAddr == nil {
		info.LocalAddr = l.localAddr(fd)
	}
	if err := l.s.initConn(c, info, target); err != nil {
		return nil, info, err
	}
	return c, info, nil
}

// initConn makes c's handler and engine, for the loop target.
func (st *serverState) initConn(c *conn, info sockfsm.ConnInfo, target *eventLoop) error {
	h, err := st.newHandler(info)
	if err == nil {
		err = c.e.Init(st.cfg, h, info)
	}
	if err != nil {
		return err
	}
	// The engine's waker: a request from any goroutine needs the loop.
	c.e.SetWaker(func(sockfsm.Op) { target.postWake(c) })
	return nil
}

func addrString(a net.Addr) string {
	if a == nil {
		return "unknown"
	}
	return a.String()
}

// remoteAddr returns the peer's address, kept in c for TCP.
func (c *conn) remoteAddr(sa syscall.Sockaddr, a *acceptor) net.Addr {
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		copy(c.ip[:], sa.Addr[:])
		c.raddr = net.TCPAddr{IP: c.ip[:4], Port: sa.Port}
		return &c.raddr
	case *syscall.SockaddrInet6:
		c.ip = sa.Addr
		c.raddr = net.TCPAddr{IP: c.ip[:], Port: sa.Port, Zone: zoneName(sa.ZoneId)}
		return &c.raddr
	case *syscall.SockaddrUnix:
		if sa.Name == "" || sa.Name == "@" {
			return a.uaddr
		}
		return &net.UnixAddr{Name: sa.Name, Net: a.uaddr.Network()}
	}
	return nil
}

// localAddr returns the local address of a connection accepted on a
// wildcard address.
func (l *eventLoop) localAddr(fd int32) net.Addr {
	sa, err := l.k.sockname(fd)
	if err != nil {
		return nil
	}
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]).To16(), Port: sa.Port}
	case *syscall.SockaddrInet6:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port, Zone: zoneName(sa.ZoneId)}
	}
	return nil
}

func zoneName(id uint32) string {
	if id == 0 {
		return ""
	}
	if ifi, err := net.InterfaceByIndex(int(id)); err == nil {
		return ifi.Name
	}
	return strconv.FormatUint(uint64(id), 10)
}

// connIDs numbers the connections of this package's servers.
var connIDs atomic.Uint64
