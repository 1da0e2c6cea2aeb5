package loop

import (
	"encoding/binary"
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
	// wait waits up to msec milliseconds (-1: forever) for events.
	wait(events []unix.EpollEvent, msec int) (int, error)
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
type epollKernel struct {
	epfd, evfd int
}

func newEpollKernel() (kernel, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	k := &epollKernel{epfd: epfd, evfd: evfd}
	if err := k.ctl(unix.EPOLL_CTL_ADD, int32(evfd), unix.EPOLLIN); err != nil {
		k.shutdown()
		return nil, err
	}
	return k, nil
}

func (k *epollKernel) ctl(op int, fd int32, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: fd}
	return unix.EpollCtl(k.epfd, op, int(fd), &ev)
}

func (k *epollKernel) wait(events []unix.EpollEvent, msec int) (int, error) {
	return unix.EpollWait(k.epfd, events, msec)
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
	unix.Close(k.epfd)
}
