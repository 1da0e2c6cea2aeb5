package loop

// A fake kernel: the sockets of a simulated world, on a virtual clock, and
// an epoll per loop with Linux's edge-triggered semantics as far as the
// loop relies on them. The property test in loop_property_test.go drives
// loops on it with rapid's draws.

import (
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// world is what the fake kernels of a test share: the clock, the sockets,
// the listener's backlog.
type world struct {
	now        time.Time
	socks      map[int32]*fsock
	backlog    []*fsock // connections the listener has not accepted yet
	nextFD     int32
	kernels    []*fakeKernel
	problems   []string // what no kernel would allow the loop to do
	acceptErrs []error  // the next accepts fail with these

	listenerNoDelay bool // TCP_NODELAY is set on the listener
	noInherit       bool // accepted sockets do not inherit TCP_NODELAY from the listener
	mptcp           bool // the listener is MPTCP: only some accepted sockets inherit TCP_NODELAY
}

// connect queues s on the listener. Like Linux, which copies the listening
// socket into each child as the handshake completes, it gives s the
// listener's TCP_NODELAY as it is now, not as it is when s is accepted.
func (w *world) connect(s *fsock) {
	s.nodelay = w.listenerNoDelay && !w.noInherit && (!w.mptcp || s.fd%2 == 0)
	w.backlog = append(w.backlog, s)
	for _, k := range w.kernels {
		k.listenEdge = true
	}
}

// dial makes a peer's socket with the given buffer sizes and queues it on
// the listener (see connect).
func (w *world) dial(rcvCap, sndCap int) *fsock {
	s := &fsock{fd: w.nextFD, rcvCap: rcvCap, sndCap: sndCap}
	w.nextFD++
	w.socks[s.fd] = s
	w.connect(s)
	return s
}

// listenFD is the fake listener's descriptor.
const listenFD = 3

func newWorld() *world {
	return &world{now: time.Unix(1_000_000, 0), socks: map[int32]*fsock{}, nextFD: 10}
}

func (w *world) problem(format string, a ...any) {
	w.problems = append(w.problems, fmt.Sprintf(format, a...))
}

// fsock is one connection's socket: the server's end, and what its peer
// did.
type fsock struct {
	fd       int32
	inq      []byte // sent by the peer, not yet read by the server
	rcvCap   int    // how much inq holds at most
	wire     []byte // everything the server wrote, in order
	peerRead int    // how much of wire the peer has read
	sndCap   int    // how much written and unread by the peer the socket holds
	readIn   int64  // bytes the server read

	peerFIN, rst, rstSeen bool
	shutWr                bool // our FIN
	closed, aborted       bool
	closes                int
	nospace               bool // a write found the socket full: the next room makes an edge
	eintr                 bool // the next read or write fails with EINTR
	writesAfterFIN        int
	unreadAtClose         int         // input left in the socket at its close: Linux answers it with RST
	nodelay               bool        // TCP_NODELAY is set
	owner                 *fakeKernel // the epoll it is registered in
}

func (s *fsock) room() int { return s.sndCap - (len(s.wire) - s.peerRead) }

// mask is the socket's readiness as tcp_poll reports it.
func (s *fsock) mask() uint32 {
	var m uint32
	if len(s.inq) > 0 || s.peerFIN || s.rst {
		m |= unix.EPOLLIN
	}
	if s.peerFIN {
		m |= unix.EPOLLRDHUP
	}
	if s.rst {
		m |= unix.EPOLLERR | unix.EPOLLHUP | unix.EPOLLRDHUP
	}
	if s.shutWr && s.peerFIN {
		m |= unix.EPOLLHUP
	}
	if s.room() > 0 || s.shutWr {
		m |= unix.EPOLLOUT
	}
	return m
}

// edge records a wake-up of the socket's wait queue.
func (w *world) edge(s *fsock) {
	if s.owner != nil {
		s.owner.edged[s.fd] = true
	}
}

// The peer's actions.

func (w *world) send(s *fsock, p []byte) int {
	n := min(len(p), s.rcvCap-len(s.inq))
	if n <= 0 || s.peerFIN || s.rst || s.closed {
		return 0
	}
	s.inq = append(s.inq, p[:n]...)
	w.edge(s)
	return n
}

func (w *world) fin(s *fsock) {
	if !s.peerFIN && !s.rst {
		s.peerFIN = true
		w.edge(s)
	}
}

func (w *world) reset(s *fsock) {
	if !s.rst && !s.closed {
		s.rst = true
		s.inq = nil
		w.edge(s)
	}
}

func (w *world) read(s *fsock, n int) {
	n = min(n, len(s.wire)-s.peerRead)
	if n <= 0 || s.rst {
		return
	}
	s.peerRead += n
	if s.nospace {
		s.nospace = false
		w.edge(s)
	}
}

// fakeKernel is one loop's kernel in the world.
type fakeKernel struct {
	w        *world
	interest map[int32]uint32
	edged    map[int32]bool
	wfd      int32

	mu     sync.Mutex // post is called from other goroutines
	posted bool       // an edge of the eventfd the next wait reports

	listenEdge bool // a connection arrived since the listener was last reported
	accepts    int  // accept calls

	waits    int           // calls to wait: the loop's turns
	lastWait time.Duration // how long the last wait would have slept: -1 without limit, 0 not at all
	idle     bool          // the last wait had nothing to report and would have blocked
	down     bool
}

func (w *world) newKernel() (kernel, error) {
	k := &fakeKernel{w: w, interest: map[int32]uint32{}, edged: map[int32]bool{}, wfd: w.nextFD}
	w.nextFD++
	w.kernels = append(w.kernels, k)
	return k, nil
}

func (k *fakeKernel) sock(op string, fd int32) *fsock {
	s := k.w.socks[fd]
	if s == nil {
		k.w.problem("%s on fd %d, which is no socket", op, fd)
		return nil
	}
	if s.closed {
		k.w.problem("%s on fd %d after it was closed", op, fd)
		return nil
	}
	return s
}

func (k *fakeKernel) ctl(op int, fd int32, events uint32) error {
	if fd == listenFD {
		switch op {
		case unix.EPOLL_CTL_ADD:
			k.interest[fd] = events
			k.listenEdge = true // ep_insert reports it ready at once
		case unix.EPOLL_CTL_DEL:
			delete(k.interest, fd)
		}
		return nil
	}
	s := k.sock("epoll_ctl", fd)
	if s == nil {
		return unix.EBADF
	}
	switch op {
	case unix.EPOLL_CTL_ADD:
		if s.owner != nil {
			k.w.problem("fd %d added to a second epoll", fd)
		}
		s.owner = k
		k.interest[fd] = events
		k.edged[fd] = true // ep_insert reports a socket ready at once
	case unix.EPOLL_CTL_MOD:
		if s.owner != k {
			k.w.problem("fd %d modified in an epoll it is not in", fd)
		}
		k.interest[fd] = events
		k.edged[fd] = true // ep_modify too
	case unix.EPOLL_CTL_DEL:
		delete(k.interest, fd)
		s.owner = nil
	}
	return nil
}

func (k *fakeKernel) wait(events []unix.EpollEvent, block bool, until time.Time) (int, error) {
	k.waits++
	switch {
	case !block:
		k.lastWait = 0
	case until.IsZero():
		k.lastWait = -1
	default:
		k.lastWait = max(until.Sub(k.w.now), 0)
	}
	n := 0
	k.mu.Lock()
	if k.posted { // an edge: reported once per post, as the eventfd is
		events[n] = unix.EpollEvent{Events: unix.EPOLLIN, Fd: k.wfd}
		n++
		k.posted = false
	}
	k.mu.Unlock()
	// Reported while its queue holds a connection; edge-triggered, only
	// after an arrival since the last report.
	if in := k.interest[listenFD]; in != 0 && len(k.w.backlog) > 0 && (in&unix.EPOLLET == 0 || k.listenEdge) {
		events[n] = unix.EpollEvent{Events: unix.EPOLLIN, Fd: listenFD}
		n++
		k.listenEdge = false
	}
	fds := make([]int32, 0, len(k.edged))
	for fd := range k.edged {
		fds = append(fds, fd)
	}
	slices.Sort(fds)
	for _, fd := range fds {
		if n == len(events) {
			break
		}
		delete(k.edged, fd)
		s := k.w.socks[fd]
		if s == nil || s.closed || s.owner != k {
			continue
		}
		if m := s.mask() & (k.interest[fd] | unix.EPOLLERR | unix.EPOLLHUP); m != 0 {
			events[n] = unix.EpollEvent{Events: m, Fd: fd}
			n++
			if k.interest[fd]&unix.EPOLLET == 0 {
				k.edged[fd] = true // level-triggered: reported while ready
			}
		}
	}
	k.idle = n == 0 && block
	return n, nil
}

func (k *fakeKernel) wakeFD() int32 { return k.wfd }

func (k *fakeKernel) post() {
	k.mu.Lock()
	k.posted = true
	k.mu.Unlock()
}

func (k *fakeKernel) accept(lfd int32) (int32, syscall.Sockaddr, error) {
	if lfd != listenFD {
		k.w.problem("accept on fd %d", lfd)
		return -1, nil, unix.EBADF
	}
	k.accepts++
	if len(k.w.backlog) == 0 {
		return -1, nil, unix.EAGAIN
	}
	if len(k.w.acceptErrs) > 0 {
		err := k.w.acceptErrs[0]
		k.w.acceptErrs = k.w.acceptErrs[1:]
		return -1, nil, err
	}
	s := k.w.backlog[0]
	k.w.backlog = k.w.backlog[1:]
	return s.fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(s.fd)}, nil
}

func (k *fakeKernel) sockname(fd int32) (syscall.Sockaddr, error) {
	return &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: 1}, nil
}

func (k *fakeKernel) listenNoDelay(lfd int32) bool {
	if lfd != listenFD {
		k.w.problem("listener setsockopt on fd %d", lfd)
		return false
	}
	k.w.listenerNoDelay = true
	return !k.w.mptcp
}

func (k *fakeKernel) setNoDelay(fd int32) error {
	s := k.sock("setsockopt", fd)
	if s == nil {
		return unix.EBADF
	}
	s.nodelay = true
	return nil
}

func (k *fakeKernel) noDelay(fd int32) (bool, error) {
	s := k.sock("getsockopt", fd)
	if s == nil {
		return false, unix.EBADF
	}
	return s.nodelay, nil
}

func (k *fakeKernel) read(fd int32, p []byte) (int, error) {
	s := k.sock("read", fd)
	if s == nil {
		return -1, unix.EBADF
	}
	if s.eintr {
		s.eintr = false
		return -1, unix.EINTR
	}
	switch {
	case s.rst && !s.rstSeen && !s.peerFIN:
		// After the peer's FIN Linux reads zero, reset or not
		// (SOCK_DONE comes before the error in tcp_recvmsg): the reset
		// shows at the next write.
		s.rstSeen = true
		return -1, unix.ECONNRESET
	case len(s.inq) > 0:
		n := copy(p, s.inq)
		s.inq = s.inq[n:]
		s.readIn += int64(n)
		return n, nil
	case s.peerFIN || s.rst:
		return 0, nil
	}
	return -1, unix.EAGAIN
}

func (k *fakeKernel) write(fd int32, p []byte) (int, error) {
	s := k.sock("write", fd)
	if s == nil {
		return -1, unix.EBADF
	}
	if s.shutWr {
		s.writesAfterFIN++
		return -1, unix.EPIPE
	}
	if s.eintr {
		s.eintr = false
		return -1, unix.EINTR
	}
	if s.rst {
		if !s.rstSeen {
			s.rstSeen = true
			return -1, unix.ECONNRESET
		}
		return -1, unix.EPIPE
	}
	if !s.nodelay && len(s.wire) > 0 {
		// Nagle's algorithm may hold a small segment back while one sent
		// earlier is unacknowledged; the first data we send, it lets go.
		k.w.problem("fd %d: a write after data went out, with Nagle's algorithm on (no TCP_NODELAY)", fd)
	}
	n := min(len(p), s.room())
	if n < len(p) {
		s.nospace = true
	}
	if n == 0 {
		return -1, unix.EAGAIN
	}
	s.wire = append(s.wire, p[:n]...)
	return n, nil
}

func (k *fakeKernel) shutdownWrite(fd int32) error {
	s := k.sock("shutdown", fd)
	if s == nil {
		return unix.EBADF
	}
	if s.shutWr {
		k.w.problem("fd %d: a second shutdown(SHUT_WR)", fd)
	}
	s.shutWr = true
	if s.rst {
		return unix.ENOTCONN
	}
	return nil
}

func (k *fakeKernel) close(fd int32) error {
	if fd == listenFD {
		return nil // the listener's duplicate
	}
	s := k.sock("close", fd)
	if s == nil {
		return unix.EBADF
	}
	if !s.closed {
		s.unreadAtClose = len(s.inq)
	}
	s.closed = true
	s.closes++
	delete(k.interest, fd)
	s.owner = nil
	return nil
}

func (k *fakeKernel) abort(fd int32) error {
	if s := k.w.socks[fd]; s != nil && !s.closed {
		s.aborted = true
	}
	return k.close(fd)
}

func (k *fakeKernel) now() time.Time { return k.w.now }

func (k *fakeKernel) shutdown() {
	if k.down {
		k.w.problem("a kernel shut down twice")
	}
	k.down = true
}
