package loop

import (
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// kernel is everything a loop asks of the operating system: the poller
// (epoll and an eventfd), the socket operations and the clock. The loop
// sees nothing else of the system, so that its logic can be tested with a
// fake kernel (fake_linux_test.go), as x/net/quic tests its loop through
// test hooks. Errors are syscall errnos (unix.Errno), returned bare.
type kernel interface {
	// ctl adds (unix.EPOLL_CTL_ADD), modifies or deletes fd's interest.
	ctl(op int, fd int32, events uint32) error
	// wait returns the events ready now; with block, if there are none,
	// it waits for some until the time until (zero: no limit).
	wait(events []unix.EpollEvent, block bool, until time.Time) (int, error)
	// wakeFD is the descriptor whose readiness means post was called.
	wakeFD() int32
	// post makes the loop's wait return; safe from any goroutine.
	post()
	// clearPost consumes the posts made so far.
	clearPost()
	// accept accepts a connection on the listener lfd, non-blocking and
	// close-on-exec.
	accept(lfd int32) (int32, syscall.Sockaddr, error)
	// sockname returns the local address of a socket.
	sockname(fd int32) (syscall.Sockaddr, error)
	// setNoDelay sets TCP_NODELAY on a TCP socket.
	setNoDelay(fd int32) error
	// listenNoDelay sets TCP_NODELAY on a TCP listener, for the sockets it
	// accepts to inherit, and reports whether they may be counted on to.
	listenNoDelay(lfd int32) bool
	// noDelay reports whether TCP_NODELAY is set on a TCP socket.
	noDelay(fd int32) (bool, error)
	read(fd int32, p []byte) (int, error)
	write(fd int32, p []byte) (int, error)
	// shutdownWrite sends our FIN.
	shutdownWrite(fd int32) error
	close(fd int32) error
	// abort closes fd with RST: SO_LINGER {1, 0}, then close.
	abort(fd int32) error
	// now reads the clock.
	now() time.Time
	// shutdown releases the poller.
	shutdown()
}

// epollKernel is the real kernel: an epoll instance and an eventfd.
//
// How a loop waits is a trade between its own cost and the rest of the
// process. A goroutine blocked in epoll_wait keeps its P until the
// runtime's sysmon takes it back, which can take up to 10 ms, and
// meanwhile, with GOMAXPROCS loops or a server pinned to one CPU, the
// process's other goroutines (those that push to connections, Shutdown,
// timers, a metrics endpoint) wait. A goroutine parked in the runtime's
// network poller frees its P, but each park and wake-up costs a trip
// through the scheduler, a second epoll_wait, and, when the P goes idle,
// sysmon's sleep and wake-up: measured on a loaded loop, more than three
// times gnet's context switches per connection (docs/performance.md).
//
// So wait does both, as the load asks. It first takes what is ready with
// a non-blocking epoll_wait. A loop that found events in its last wait is
// busy, and more are likely soon: it yields once (runtime.Gosched, so
// that runnable goroutines go first) and then blocks in epoll_wait itself
// for at most busyWait. A loop that found nothing for that long is idle:
// it parks in the runtime's poller on the epoll descriptor (readable when
// it has events), with the loop's next timer as the read deadline, and
// holds no P while it sleeps. So a busy loop lets runnable goroutines go
// first at each wait, leaves those waiting for the network to sysmon's
// poll (at least every 10 ms, as for any goroutine that keeps its P), and
// an idle loop costs the process nothing.
type epollKernel struct {
	epfd, evfd int
	ep         *os.File        // epfd, registered in the runtime's poller
	rc         syscall.RawConn // ep's
	poll       func(uintptr) bool

	dl   time.Time // ep's read deadline
	busy bool      // the last wait found events: block in epoll_wait first

	// What poll leaves for wait.
	events []unix.EpollEvent
	n      int
	err    error
}

func newEpollKernel() (kernel, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	k := &epollKernel{epfd: epfd, evfd: evfd, ep: os.NewFile(uintptr(epfd), "epoll")}
	k.poll = k.pollOnce
	rc, err := k.ep.SyscallConn()
	if err == nil {
		k.rc = rc
		err = k.ctl(unix.EPOLL_CTL_ADD, int32(evfd), unix.EPOLLIN)
	}
	if err != nil {
		k.shutdown()
		return nil, err
	}
	return k, nil
}

func (k *epollKernel) ctl(op int, fd int32, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: fd}
	return unix.EpollCtl(k.epfd, op, int(fd), &ev)
}

// busyWait is how long a busy loop blocks in epoll_wait before it parks
// in the runtime's poller; epoll_wait counts in milliseconds.
const busyWait = 1 // ms

// wait takes the events ready now, then, if block and there are none,
// waits for some until the time until (zero: no limit): in epoll_wait for
// at most busyWait if the loop is busy, then parked in the runtime's
// poller (see epollKernel).
func (k *epollKernel) wait(events []unix.EpollEvent, block bool, until time.Time) (int, error) {
	if block && !k.busy {
		// Idle: park, whose first poll takes what is ready now.
		n, err := k.park(events, until)
		k.busy = n > 0
		return n, err
	}
	n, err := k.epollWait(events, 0)
	if n > 0 || err != nil || !block {
		k.busy = k.busy || n > 0
		return n, err
	}
	runtime.Gosched()
	msec := busyWait
	if !until.IsZero() {
		// After the Gosched, which may have taken a while; rounded up: a
		// timer is never taken early.
		msec = min(msec, int((time.Until(until)+time.Millisecond-1)/time.Millisecond))
		if msec <= 0 {
			return 0, nil
		}
	}
	n, err = k.epollWait(events, msec)
	if n > 0 || err != nil {
		return n, err
	}
	k.busy = false
	if !until.IsZero() && !time.Now().Before(until) {
		return 0, nil
	}
	n, err = k.park(events, until)
	k.busy = n > 0
	return n, err
}

// epollWait is one epoll_wait; EINTR is no error, and no event.
func (k *epollKernel) epollWait(events []unix.EpollEvent, msec int) (int, error) {
	n, err := unix.EpollWait(k.epfd, events, msec)
	if err == unix.EINTR {
		return 0, nil
	}
	return max(n, 0), err
}

// park waits in the runtime's poller for the epoll descriptor to become
// readable, with until as its read deadline, set only when it changes:
// the loop's first timer seldom does.
func (k *epollKernel) park(events []unix.EpollEvent, until time.Time) (int, error) {
	if !until.Equal(k.dl) {
		if err := k.ep.SetReadDeadline(until); err != nil {
			return 0, err
		}
		k.dl = until
	}
	k.events, k.n, k.err = events, 0, nil
	err := k.rc.Read(k.poll)
	k.events = nil
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, nil
		}
		return 0, err
	}
	return k.n, k.err
}

// pollOnce is the RawConn.Read function of wait: it takes the events ready
// now, and reports false, to wait for the epoll descriptor to become
// readable, if there are none.
func (k *epollKernel) pollOnce(fd uintptr) bool {
	n, err := unix.EpollWait(int(fd), k.events, 0)
	if err == unix.EINTR || (err == nil && n == 0) {
		return false
	}
	k.n, k.err = max(n, 0), err
	return true
}

func (k *epollKernel) wakeFD() int32 { return int32(k.evfd) }

var one = binary.NativeEndian.AppendUint64(nil, 1)

func (k *epollKernel) post() {
	// EAGAIN means the counter is full: the loop has a wake-up pending
	// anyway.
	unix.Write(k.evfd, one)
}

func (k *epollKernel) clearPost() {
	var b [8]byte
	unix.Read(k.evfd, b[:])
}

// accept uses the standard library's accept4, not x/sys's: for an IP
// peer, x/sys asks the listener's protocol (getsockopt SO_PROTOCOL) on
// every call, to tell L2TP from TCP.
func (k *epollKernel) accept(lfd int32) (int32, syscall.Sockaddr, error) {
	fd, sa, err := syscall.Accept4(int(lfd), syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
	if err != nil {
		return -1, nil, err
	}
	return int32(fd), sa, nil
}

// sockname: the standard library's, for the reason accept gives.
func (k *epollKernel) sockname(fd int32) (syscall.Sockaddr, error) {
	return syscall.Getsockname(int(fd))
}

func (k *epollKernel) setNoDelay(fd int32) error {
	return unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
}

// listenNoDelay sets TCP_NODELAY on a TCP listener and reports whether the
// sockets it accepts may be counted on to inherit it: Linux copies the
// listening socket into each child, TCP_NODELAY with it, but an MPTCP
// listener (net's default since Go 1.24) accepts MPTCP sockets and plain
// TCP ones, and whether both kinds inherit it varies with the kernel.
func (k *epollKernel) listenNoDelay(lfd int32) bool {
	err := k.setNoDelay(lfd)
	proto, perr := unix.GetsockoptInt(int(lfd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
	return err == nil && perr == nil && proto == unix.IPPROTO_TCP
}

func (k *epollKernel) noDelay(fd int32) (bool, error) {
	v, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY)
	return v != 0, err
}

func (k *epollKernel) read(fd int32, p []byte) (int, error) { return unix.Read(int(fd), p) }

func (k *epollKernel) write(fd int32, p []byte) (int, error) { return unix.Write(int(fd), p) }

func (k *epollKernel) shutdownWrite(fd int32) error { return unix.Shutdown(int(fd), unix.SHUT_WR) }

func (k *epollKernel) close(fd int32) error { return unix.Close(int(fd)) }

func (k *epollKernel) abort(fd int32) error {
	// Unix sockets accept SO_LINGER and ignore it: their close is their
	// abort (transport.Unix says the same).
	lerr := unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	if err := unix.Close(int(fd)); err != nil {
		return err
	}
	return lerr
}

func (k *epollKernel) now() time.Time { return time.Now() }

func (k *epollKernel) shutdown() {
	unix.Close(k.evfd)
	k.ep.Close() // and epfd
}
