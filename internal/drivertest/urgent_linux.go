package drivertest

import (
	"net"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// testUrgentData: a peer sends urgent data (TCP's out-of-band byte, as
// telnet's interrupt does) in the middle of its request, then its FIN.
// Linux ends a read at the urgent mark, so a short read there does not
// mean the input is all read: the server must read on to the peer's EOF.
// The client gets the echo of the in-band bytes, exactly, and the server's
// FIN, never a reset (which closing with the rest unread would send).
func testUrgentData(t *testing.T, f Factory) {
	gated, release := conntest.GatedEcho(t)
	s := start(t, f, sockfsm.Config{}, gated)
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("this is "))
	oob(t, c, '!')
	conntest.MustWrite(t, c, []byte("a test"))
	conntest.CloseWrite(t, c)
	// Our FIN acknowledged: everything before it is in the server's
	// socket before its first read.
	conntest.WaitUntil(t, "the client's FIN to be acknowledged", func() bool { return tcpState(t, c) == tcpFinWait2 })
	release()
	const want = "this is a test" // the urgent byte is not in the stream
	if got := conntest.ReadToEOF(t, c); string(got) != want {
		t.Fatalf("echo = %q, want %q then EOF", got, want)
	}
	info := s.closed(t, c)
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, Linger: sockfsm.LingerEndNone, PeerFIN: true,
		BytesRead: int64(len(want)), BytesWritten: int64(len(want))})
}

// tcpFinWait2 is Linux's TCP_FIN_WAIT2: our FIN was sent and acknowledged.
const tcpFinWait2 = 5

// tcpState returns the state of c's socket (TCP_INFO).
func tcpState(t *testing.T, c *net.TCPConn) uint8 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		t.Fatal(err)
	}
	if ierr != nil {
		t.Fatalf("TCP_INFO: %v", ierr)
	}
	return info.State
}

// oob sends b as urgent data (MSG_OOB) on c.
func oob(t *testing.T, c *net.TCPConn, b byte) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = syscall.Sendto(int(fd), []byte{b}, syscall.MSG_OOB, nil)
		return serr != syscall.EAGAIN
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("send MSG_OOB: %v", serr)
	}
}
