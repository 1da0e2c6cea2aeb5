package loop

import (
	"encoding/binary"
	"errors"
	"os"
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
	// close-on-exec; tcp asks for TCP_NODELAY.
	accept(lfd int32, tcp bool) (int32, unix.Sockaddr, error)
	// sockname returns the local address of a socket.
	sockname(fd int32) (unix.Sockaddr, error)
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
// A loop that has nothing to do does not sleep in epoll_wait: a goroutine
// blocked in a system call keeps its P until the runtime's sysmon takes it
// back, which can take up to 10 ms, and meanwhile, with GOMAXPROCS loops or
// a server pinned to one CPU, the process's other goroutines (those that
// push to connections, Shutdown, timers) wait. It parks in the runtime's
// network poller instead, on the epoll descriptor itself (an epoll
// descriptor is readable when it has events), with the loop's next timer
// as the read deadline: the goroutine is an ordinary parked goroutine, and
// a busy loop still takes its events with one non-blocking epoll_wait per
// turn.
type epollKernel struct {
	epfd, evfd int
	ep         *os.File        // epfd, registered in the runtime's poller
	rc         syscall.RawConn // ep's
	poll       func(uintptr) bool

	dl time.Time // ep's read deadline

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

// wait parks in the runtime's poller (see epollKernel), with until as the
// epoll descriptor's read deadline, set only when it changes: the loop's
// first timer seldom does.
func (k *epollKernel) wait(events []unix.EpollEvent, block bool, until time.Time) (int, error) {
	if !block {
		n, err := unix.EpollWait(k.epfd, events, 0)
		if err == unix.EINTR {
			return 0, nil
		}
		return max(n, 0), err
	}
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

func (k *epollKernel) accept(lfd int32, tcp bool) (int32, unix.Sockaddr, error) {
	fd, sa, err := unix.Accept4(int(lfd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
	if err != nil {
		return -1, nil, err
	}
	if tcp {
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	return int32(fd), sa, nil
}

func (k *epollKernel) sockname(fd int32) (unix.Sockaddr, error) { return unix.Getsockname(int(fd)) }

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
