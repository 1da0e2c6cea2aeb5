package loop

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// noDelayCounter counts the TCP_NODELAY system calls a loop makes on the
// sockets it accepts.
type noDelayCounter struct {
	kernel
	sets, asks int
}

func (k *noDelayCounter) setNoDelay(fd int32) error { k.sets++; return k.kernel.setNoDelay(fd) }

func (k *noDelayCounter) noDelay(fd int32) (bool, error) { k.asks++; return k.kernel.noDelay(fd) }

// TestAcceptedConnsHaveNoDelay: on the real kernel, every TCP connection
// the loop accepts has TCP_NODELAY by its second write, as net's accepted
// connections have it (Nagle's algorithm holds nothing back before then;
// see noDelay). On a plain TCP listener, which Linux copies it from, it
// costs one getsockopt for the first connection and no system call for
// the others; on net's default listener (MPTCP where the kernel has it) it
// is set on each before its second write, and not before.
func TestAcceptedConnsHaveNoDelay(t *testing.T) {
	plain := net.ListenConfig{}
	plain.SetMultipathTCP(false)
	var mptcp net.Dialer
	mptcp.SetMultipathTCP(true)
	for _, tc := range []struct {
		name  string
		lc    net.ListenConfig
		d     net.Dialer
		plain bool
	}{
		{"plain TCP", plain, net.Dialer{}, true},
		// A TCP client of an MPTCP listener gets a plain TCP socket, an
		// MPTCP client an MPTCP one.
		{"net's default", net.ListenConfig{}, net.Dialer{}, false},
		{"net's default, MPTCP clients", net.ListenConfig{}, mptcp, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := tc.lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			a, err := newAcceptor(ln)
			if err != nil {
				t.Fatal(err)
			}
			real, err := newEpollKernel()
			if err != nil {
				t.Fatal(err)
			}
			defer real.shutdown()
			defer real.close(a.fd)
			k := &noDelayCounter{kernel: real}
			l := &eventLoop{k: k}
			l.addAcceptor(a)
			const conns = 4
			for i := range conns {
				c, err := tc.d.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				fd, sa, err := acceptBounded(k, a.fd)
				if err != nil {
					t.Fatalf("accept %d: %v", i, err)
				}
				defer k.close(fd)
				if key, _, ok := ipKey(sa); !ok || key.String() != "127.0.0.1" {
					t.Errorf("accept %d: peer %v, want 127.0.0.1", i, sa)
				}
				if i == 0 {
					p, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
					t.Logf("the first accepted socket's protocol: %d", p)
				}
				lc := &conn{fd: fd}
				if l.noDelay(a, fd) {
					lc.flags = fNagle
				}
				sets := k.sets
				for w := range 2 {
					l.beforeWrite(lc)
					if w == 1 {
						if on, err := real.noDelay(fd); err != nil || !on {
							t.Errorf("connection %d, second write: TCP_NODELAY %v (%v), want set", i, on, err)
						}
					}
					if _, err := k.write(fd, []byte("x")); err != nil {
						t.Fatalf("connection %d, write %d: %v", i, w, err)
					}
					if w == 0 && k.sets != sets {
						t.Errorf("connection %d: setsockopt before the first write, want none until the second", i)
					}
				}
			}
			proto, _ := unix.GetsockoptInt(int(a.fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
			t.Logf("listener protocol %d: %d getsockopt, %d setsockopt for %d connections", proto, k.asks, k.sets, conns)
			if tc.plain && (k.asks != 1 || k.sets != 0) {
				t.Errorf("plain TCP listener: %d getsockopt and %d setsockopt for %d connections, want 1 and 0 (inherited from the listener)", k.asks, k.sets, conns)
			}
			if proto == unix.IPPROTO_MPTCP && (k.asks != 0 || k.sets != conns) {
				t.Errorf("MPTCP listener: %d getsockopt and %d setsockopt for %d connections, want 0 and one each (at its second write)", k.asks, k.sets, conns)
			}
			if _, _, err := k.accept(a.fd); err != unix.EAGAIN {
				t.Errorf("accept with an empty queue: %v, want EAGAIN", err)
			}
		})
	}
}

// acceptBounded accepts on the non-blocking listener lfd, retrying EAGAIN
// for at most 5 s: Dial has returned, the connection is on its way to the
// queue.
func acceptBounded(k kernel, lfd int32) (int32, syscall.Sockaddr, error) {
	for i := 0; ; i++ {
		fd, sa, err := k.accept(lfd)
		if err != unix.EAGAIN || i == 500 {
			return fd, sa, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestIdleLoopsPark: a loop with nothing to do parks in the runtime's
// network poller, holding no P and making no system call, within a bounded
// time of its last event; it does not keep polling epoll_wait (a busy
// loop's way of waiting). Each loop's goroutine is found parked in
// epollKernel.park, in the state the runtime gives a goroutine waiting for
// the network.
func TestIdleLoopsPark(t *testing.T) {
	checkFDs(t)
	const loops = 2
	ts := startServer(t, "tcp", "127.0.0.1:0", loops, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	// Make each loop busy: a connection each, one echo each.
	for range loops {
		c := ts.dial(t)
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if got := conntest.ReadFull(t, c, 1); string(got) != "x" {
			t.Fatalf("echo %q", got)
		}
	}
	var parked int
	var stacks []byte
	for range 500 { // at most 5 s
		time.Sleep(10 * time.Millisecond)
		stacks = make([]byte, 1<<20)
		stacks = stacks[:runtime.Stack(stacks, true)]
		parked = 0
		for _, g := range bytes.Split(stacks, []byte("\n\n")) {
			if bytes.Contains(g, []byte("loop.(*eventLoop).run")) &&
				bytes.Contains(g, []byte("[IO wait")) && bytes.Contains(g, []byte("loop.(*epollKernel).park")) {
				parked++
			}
		}
		if parked == loops+1 { // and the accepting loop
			return
		}
	}
	t.Fatalf("%d of %d idle loops parked in the runtime's poller; goroutines:\n%s", parked, loops+1, stacks)
}

// TestMPTCPClient: net.Listen makes MPTCP listeners (since Go 1.24), so an
// MPTCP client gets an MPTCP socket on the loop, not a plain TCP one. The
// tutorial's exchange keeps every promise on it: the echo, then our FIN
// after the client's, no reset; and an abort reaches the client as a
// reset. Skipped where the kernel has no MPTCP.
func TestMPTCPClient(t *testing.T) {
	checkFDs(t)
	aborts := sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
		if string(p) == "abort" {
			c.Abort(nil)
			return
		}
		c.Write(p)
	})
	ts := startServer(t, "tcp", "127.0.0.1:0", 2, sockfsm.Config{}, conntest.Always(aborts))
	var d net.Dialer
	d.SetMultipathTCP(true)
	dial := func() *net.TCPConn {
		c, err := d.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(clientDeadline))
		tc := c.(*net.TCPConn)
		if mp, err := tc.MultipathTCP(); err != nil || !mp {
			t.Skipf("the connection is not MPTCP (%v, %v): no MPTCP here", mp, err)
		}
		return tc
	}

	c := dial()
	const msg = "this is a test"
	conntest.MustWrite(t, c, []byte(msg))
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); string(got) != msg {
		t.Fatalf("client received %q, want %q", got, msg)
	}
	conntest.CheckInfo(t, ts.rec.wait(t, conntest.Key(c)), conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true,
		BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})

	c = dial()
	conntest.MustWrite(t, c, []byte("abort"))
	conntest.WantReset(t, c, nil)
	conntest.CheckInfo(t, ts.rec.wait(t, conntest.Key(c)), conntest.WantInfo{Reason: sockfsm.ReasonHandlerAbort, Aborted: true,
		Err: sockfsm.ErrAborted, BytesRead: 5, BytesWritten: 0})
}

// TestBusyTimeout: a busy loop sleeps without a timeout when its tick
// comes before its first timer, and otherwise wakes for the timer, never
// before it: the epoll_wait timeout is rounded up to the millisecond.
func TestBusyTimeout(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want int
	}{
		{time.Nanosecond, 1},
		{time.Millisecond, 1},
		{time.Millisecond + time.Nanosecond, 2},
		{tickPeriod - time.Nanosecond, int(tickPeriod / time.Millisecond)},
		{tickPeriod, -1},
		{time.Hour, -1},
	} {
		if got := busyTimeout(tc.d); got != tc.want {
			t.Errorf("busyTimeout(%v) = %d, want %d", tc.d, got, tc.want)
		}
	}
}

// epollKernelForTest returns a real epoll kernel, shut down when the test
// ends, and an events array for its waits.
func epollKernelForTest(t *testing.T) (*epollKernel, []unix.EpollEvent) {
	t.Helper()
	k, err := newEpollKernel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.shutdown)
	return k.(*epollKernel), make([]unix.EpollEvent, 4)
}

// TestBusyWaitEndsAtTimer: on the real kernel, a busy loop whose first
// timer is due before its tick waits for the timer, not for the tick: the
// wait returns at the timer (never before it) with the loop still busy. A
// wait that slept until the tick would have seen a tick period with
// nothing in it and left the loop idle, its timer up to a tick late. The
// tick is restarted for each try; a try whose wait the tick still beat (a
// test machine that did not run it for half a tick period), or that a
// signal ended early (EINTR: the runtime's preemption), is tried again.
func TestBusyWaitEndsAtTimer(t *testing.T) {
	k, events := epollKernelForTest(t)
	const tries = 3
	for try := 1; ; try++ {
		k.setBusy(true)
		if !k.busy {
			t.Fatal("setBusy(true) left the loop idle: no tick")
		}
		until := time.Now().Add(tickPeriod / 2)
		n, err := k.wait(events, true, until)
		if err != nil || n != 0 {
			t.Fatalf("wait: %d events, %v; want 0, nil (nothing is registered)", n, err)
		}
		if k.busy && !time.Now().Before(until) {
			return
		}
		if try == tries {
			t.Fatalf("in %d tries, a busy wait with its timer due in %v (tick %v) always ended at the tick, leaving the loop idle, or early", tries, tickPeriod/2, tickPeriod)
		}
	}
}

// TestPostIsAnEdge: on the real kernel, the loop's eventfd, which it never
// reads, makes each wait report it once per post made after the last wait
// that reported it; a post with the counter full (2^64-2 posts) still
// makes one.
func TestPostIsAnEdge(t *testing.T) {
	k, events := epollKernelForTest(t)
	woken := func() bool {
		t.Helper()
		n, err := k.wait(events, false, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range events[:n] {
			if ev.Fd == k.wakeFD() {
				return true
			}
		}
		return false
	}
	if woken() {
		t.Fatal("a wait reported the eventfd before any post")
	}
	for i := range 3 {
		k.post()
		if !woken() {
			t.Fatalf("post %d: the next wait did not report it", i+1)
		}
		if woken() {
			t.Fatalf("post %d: a second wait reported it again", i+1)
		}
	}
	k.post()
	k.post()
	if !woken() || woken() {
		t.Error("two posts before a wait: want it reported by one wait")
	}
	// Fill the counter: 5 posts so far, and it holds at most 2^64-2.
	full := binary.NativeEndian.AppendUint64(nil, 1<<64-2-5)
	if _, err := unix.Write(k.evfd, full); err != nil {
		t.Fatal(err)
	}
	woken() // that write was an edge too
	if _, err := unix.Write(k.evfd, one); err != unix.EAGAIN {
		t.Fatalf("a write to the full counter: %v, want EAGAIN", err)
	}
	k.post()
	if !woken() {
		t.Error("a post with the counter full: the next wait did not report it")
	}
}

// TestKernelClock: the real kernel's clock (epollKernel.now), which reads
// the wall clock only once a second, is the system's. Every reading
// carries a monotonic reading, which is what the loop subtracts, and on it
// falls between the time.Now before it and the one after it; once its
// anchor is a second old, the next reading takes a new one, whose wall
// clock is the system's at that instant.
func TestKernelClock(t *testing.T) {
	k, _ := epollKernelForTest(t)
	read := func(i int) time.Time {
		t.Helper()
		t0 := time.Now()
		got := k.now()
		t1 := time.Now()
		if got == got.Round(0) {
			t.Fatalf("reading %d: now() = %v carries no monotonic reading", i, got)
		}
		if got.Before(t0) || got.After(t1) {
			t.Fatalf("reading %d: now() = %v, outside [%v, %v] on the monotonic clock", i, got, t0, t1)
		}
		return got
	}
	for i := range 100 {
		read(i) // the first takes the anchor; the others add to it
	}
	k.clock = k.clock.Add(-2 * time.Second) // a second old, and more
	aged := k.clock
	t0 := time.Now().Round(0)
	got := read(100)
	t1 := time.Now().Round(0)
	if k.clock == aged {
		t.Fatal("a reading with an anchor two seconds old kept it")
	}
	if wall := got.Round(0); wall.Before(t0) || wall.After(t1) {
		t.Fatalf("the reading that took a new anchor has wall clock %v, outside [%v, %v]", wall, t0, t1)
	}
}

// TestNoSIGPIPE: a write to a socket whose peer has gone fails with EPIPE
// and raises no SIGPIPE (the loop's writes are send(2) with MSG_NOSIGNAL),
// so a program that asked os/signal for SIGPIPE is not sent one for every
// peer that hangs up on a response. A Unix stream socket raises it at the
// first write after the peer's close. The check is exact, with no waiting
// on a clock: the signal would be raised in the write, before the
// connection's OnClose; afterwards the test sends itself SIGALRM. The
// runtime hands signals to os/signal in the order they were raised, and
// those pending together lowest number first (SIGPIPE is 13, SIGALRM 14),
// so a SIGPIPE would come before it.
func TestNoSIGPIPE(t *testing.T) {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGPIPE, syscall.SIGALRM)
	defer signal.Stop(sigs)
	gated, release := conntest.GatedEcho(t)
	ts := startServer(t, "unix", filepath.Join(t.TempDir(), "s"), 1, sockfsm.Config{}, gated)
	c := ts.dial(t)
	key := conntest.Key(c)
	conntest.MustWrite(t, c, []byte("hello"))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	release() // the echo's write finds the peer gone
	info := ts.rec.wait(t, key)
	if !errors.Is(info.Err, syscall.EPIPE) {
		t.Fatalf("CloseInfo.Err = %v, want EPIPE (the write after the peer's close)", info.Err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGALRM); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-sigs:
		if s == syscall.SIGPIPE {
			t.Fatal("the loop's write raised SIGPIPE")
		}
		// SIGALRM, with no SIGPIPE before it
	case <-time.After(conntest.Deadline):
		t.Fatal("SIGALRM never arrived")
	}
}
