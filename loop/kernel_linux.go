package loop

import (
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm/internal/sockcall"
)

// kernel is everything a loop asks of the operating system: the poller
// (epoll, an eventfd and, in the real one, a timerfd), the socket
// operations and the clock. The loop
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
	// post makes the loop's wait return; safe from any goroutine. Each
	// post after the wait that reported the last one makes it report
	// wakeFD again: nothing is read to clear it.
	post()
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
	// now reads the clock; the loop's goroutine alone calls it.
	now() time.Time
	// shutdown releases the poller.
	shutdown()
}

// epollKernel is the real kernel: an epoll instance, an eventfd for posts
// and a timerfd for the busy loop's tick.
//
// How a loop waits is a trade between its own cost and the rest of the
// process. A goroutine blocked in epoll_wait keeps its P until the
// runtime's sysmon takes it back, which can take up to 10 ms, and
// meanwhile, with a loop per P or a server pinned to one CPU, the
// process's other goroutines (those that push to connections, Shutdown,
// timers, a metrics endpoint) wait. A goroutine parked in the runtime's
// network poller frees its P, but each park and wake-up costs a trip
// through the scheduler, a second epoll_wait, and, when the P goes idle,
// sysmon's sleep and wake-up: measured on a loaded loop, more than three
// times gnet's context switches per connection. And an epoll_wait with a
// timeout arms and cancels a kernel timer each time it sleeps: on the
// virtual machine measured, about 8 µs of a churned connection's 62
// (docs/performance.md, the third step).
//
// So wait does both, as the load asks, and sleeps without a timeout when
// it can. It first takes what is ready with a non-blocking epoll_wait. A
// busy loop then yields once (runtime.Gosched, so that runnable
// goroutines go first) and blocks in epoll_wait itself, with no timeout
// unless its next timer is due before the next tick: a timerfd in the
// epoll set ticks every tickPeriod while the loop is busy, which bounds
// the sleep without arming a timer per sleep, and tells wait when the
// loop has had nothing but ticks for a whole period. The loop is idle
// then: the tick stops, and the loop parks in the runtime's poller on the
// epoll descriptor (readable when it has events), with its next timer as
// the read deadline, holding no P while it sleeps; its next events make
// it busy again. So a busy loop lets runnable goroutines go first at each
// wait and leaves those waiting for the network to sysmon's poll (at
// least every 10 ms, as for any goroutine that keeps its P), and an idle
// loop costs the process nothing.
type epollKernel struct {
	epfd, evfd, tfd int
	ep              *os.File        // epfd, registered in the runtime's poller
	rc              syscall.RawConn // ep's
	poll            func(uintptr) bool

	dl     time.Time // ep's read deadline
	clock  time.Time // what now adds the monotonic clock's advance to (see now)
	busy   bool      // the tick runs: wait blocks in epoll_wait
	active bool      // busy, and events other than ticks came in this tick period
	// idle: busy, and a whole tick period passed with no epoll event but
	// the tick (work in the run queue does not count).
	idle bool

	// What poll leaves for wait.
	events []unix.EpollEvent
	n      int
	err    error
}

// tickPeriod is the busy loop's tick: a loop that has had nothing to do
// for a tick period (one to two periods) parks.
const tickPeriod = 10 * time.Millisecond

func newEpollKernel() (kernel, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	k := &epollKernel{epfd: epfd, evfd: -1, tfd: -1, ep: os.NewFile(uintptr(epfd), "epoll")}
	k.poll = k.pollOnce
	k.evfd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		err = os.NewSyscallError("eventfd", err)
	}
	if err == nil {
		k.tfd, err = unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
		if err != nil {
			err = os.NewSyscallError("timerfd_create", err)
		}
	}
	if err == nil {
		k.rc, err = k.ep.SyscallConn()
	}
	if err == nil {
		err = k.ctl(unix.EPOLL_CTL_ADD, int32(k.evfd), unix.EPOLLIN|unix.EPOLLET) // see post
	}
	if err == nil {
		err = k.ctl(unix.EPOLL_CTL_ADD, int32(k.tfd), unix.EPOLLIN)
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

// wait takes the events ready now, then, if block and there are none,
// waits for some until the time until (zero: no limit): in epoll_wait if
// the loop is busy, parked in the runtime's poller if it is idle (see
// epollKernel). The tick's events are the kernel's own: wait never
// returns them.
func (k *epollKernel) wait(events []unix.EpollEvent, block bool, until time.Time) (int, error) {
	if block && !k.busy {
		return k.park(events, until)
	}
	n, err := k.epollWait(events, 0)
	if n > 0 || err != nil || !block {
		if n > 0 && !k.busy {
			k.setBusy(true)
		}
		return n, err
	}
	if !k.idle {
		runtime.Gosched()
		msec := -1
		if !until.IsZero() {
			// After the Gosched, which may have taken a while.
			d := time.Until(until)
			if d <= 0 {
				return 0, nil
			}
			msec = busyTimeout(d)
		}
		n, err = k.epollWait(events, msec)
		if n > 0 || err != nil || !k.idle {
			return n, err // a tick with work in its period: the loop turns
		}
	}
	k.setBusy(false)
	if !until.IsZero() && !time.Now().Before(until) {
		return 0, nil
	}
	return k.park(events, until)
}

// busyTimeout is the epoll_wait timeout of a busy loop whose first timer
// is due in d (positive): none (-1) if the tick comes first, else d in
// milliseconds, rounded up: a timer is never taken early.
func busyTimeout(d time.Duration) int {
	if d >= tickPeriod {
		return -1
	}
	return int((d + time.Millisecond - 1) / time.Millisecond)
}

// setBusy starts or stops the tick. A tick that cannot be started leaves
// the loop idle: it parks, which needs no tick.
func (k *epollKernel) setBusy(busy bool) {
	var spec unix.ItimerSpec // zero: stopped
	if busy {
		spec.Interval = unix.NsecToTimespec(int64(tickPeriod))
		spec.Value = spec.Interval
	}
	err := unix.TimerfdSettime(k.tfd, 0, &spec, nil)
	k.busy, k.active, k.idle = busy && err == nil, false, false
	if !k.busy {
		k.clearTick()
	}
}

// clearTick consumes the tick's expirations.
func (k *epollKernel) clearTick() {
	var b [8]byte
	unix.Read(k.tfd, b[:])
}

// filter takes the tick's event out of events[:n] and returns how many are
// left. A tick ends a tick period: one that saw no other event makes the
// loop idle.
func (k *epollKernel) filter(events []unix.EpollEvent, n int) int {
	tick := false
	for i := 0; i < n; i++ {
		if events[i].Fd == int32(k.tfd) {
			tick = true
			n--
			events[i] = events[n]
			i--
		}
	}
	if n > 0 {
		k.active, k.idle = true, false
	}
	if tick {
		k.clearTick()
		if k.busy {
			k.idle = !k.active
			k.active = false
		}
	}
	return n
}

// epollWait is one epoll_wait; EINTR is no error, and no event.
func (k *epollKernel) epollWait(events []unix.EpollEvent, msec int) (int, error) {
	n, err := unix.EpollWait(k.epfd, events, msec)
	if err == unix.EINTR {
		return 0, nil
	}
	return k.filter(events, max(n, 0)), err
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
	if k.n > 0 {
		k.setBusy(true)
	}
	return k.n, k.err
}

// pollOnce is the RawConn.Read function of wait: it takes the events ready
// now, and reports false, to wait for the epoll descriptor to become
// readable, if there are none.
func (k *epollKernel) pollOnce(fd uintptr) bool {
	n, err := unix.EpollWait(int(fd), k.events, 0)
	if err == unix.EINTR {
		return false
	}
	n = k.filter(k.events, max(n, 0))
	if err == nil && n == 0 {
		return false
	}
	k.n, k.err = n, err
	return true
}

func (k *epollKernel) wakeFD() int32 { return int32(k.evfd) }

var one = binary.NativeEndian.AppendUint64(nil, 1)

// post writes the eventfd. It is in the epoll set edge-triggered, and
// every write to an eventfd wakes its waiters (eventfd_write), so each
// write is an edge: a post after the wait that reported the last one is
// reported by the next, whether or not the counter was read down. So the
// loop never reads it, and a wake-up costs one system call, not two (gnet
// does the same). The counter fills only after 2^64-2 posts; then the
// write fails with EAGAIN, a read empties it, and the post is made.
func (k *epollKernel) post() {
	if _, err := unix.Write(k.evfd, one); err == unix.EAGAIN {
		var b [8]byte
		unix.Read(k.evfd, b[:])
		unix.Write(k.evfd, one)
	}
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

// read and write are recv(2) and send(2), not read(2) and write(2): on a
// socket they do the same, and skip the file layer above the socket's
// (see package sockcall), which on the machine measured saved about 3% of
// a 64-byte write and the read that takes it over loopback
// (BenchmarkSocketCalls; docs/performance.md). Both pass MSG_DONTWAIT, so
// they never block even if a Config.Prelude left the socket's file
// description (which its net.Conn shares) in blocking mode. write passes
// MSG_NOSIGNAL: a write that fails with EPIPE (on TCP, one after the
// socket was reset and the reset reported, or after our FIN; on a Unix
// socket, any write after the peer's close) raises no SIGPIPE, which the
// runtime would otherwise take and drop, and which a program that asked
// os/signal for SIGPIPE would receive.
func (k *epollKernel) read(fd int32, p []byte) (int, error) {
	return sockcall.Recv(int(fd), p, unix.MSG_DONTWAIT)
}

func (k *epollKernel) write(fd int32, p []byte) (int, error) {
	return sockcall.Send(int(fd), p, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
}

func (k *epollKernel) shutdownWrite(fd int32) error { return unix.Shutdown(int(fd), unix.SHUT_WR) }

func (k *epollKernel) close(fd int32) error { return unix.Close(int(fd)) }

func (k *epollKernel) abort(fd int32) error { return abortFD(fd) }

// abortFD closes the socket fd with RST: SO_LINGER 0, then close.
func abortFD(fd int32) error {
	// Unix sockets accept SO_LINGER and ignore it: their close is their
	// abort (transport.Unix says the same).
	lerr := unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	if err := unix.Close(int(fd)); err != nil {
		return err
	}
	return lerr
}

// now reads the monotonic clock, and the wall clock once a second: it
// adds the monotonic clock's advance to an anchor, a time.Now taken anew
// when the anchor is a second old. time.Now reads both clocks, each a vDSO
// call (BenchmarkClock: about 60 ns against 40 on the machine measured,
// whose clock source is kvm-clock), and the loop reads the clock at every
// engine step, three times or more per echo exchange. Nothing on the loop
// reads a time's wall clock: the engines and the timers subtract times,
// which uses the monotonic readings. The wall clock of a reading follows
// the system's as the monotonic clock does, so after the system's clock
// is stepped (settimeofday, an NTP step, a resumed VM) it is off by the
// step for up to a second; it is kept only for whoever prints an engine's
// deadline. now keeps state: the loop's goroutine alone calls it.
func (k *epollKernel) now() time.Time {
	if d := time.Since(k.clock); d < time.Second {
		return k.clock.Add(d)
	}
	k.clock = time.Now()
	return k.clock
}

func (k *epollKernel) shutdown() {
	for _, fd := range []int{k.evfd, k.tfd} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	k.ep.Close() // and epfd
}
