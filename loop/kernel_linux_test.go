package loop

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAcceptedConnsHaveNoDelay: on the real kernel, every TCP connection
// the loop accepts has TCP_NODELAY, as net's accepted connections have it;
// and, Linux copying it from the listener, which addAcceptor set it on, no
// connection after the first costs a system call for it.
func TestAcceptedConnsHaveNoDelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := newAcceptor(ln)
	if err != nil {
		t.Fatal(err)
	}
	k, err := newEpollKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer k.shutdown()
	defer k.close(a.fd)
	l := &eventLoop{k: k}
	l.addAcceptor(a)
	for i := range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Dial returns once the handshake is done: the connection is in
		// the accept queue.
		fd, sa, err := k.accept(a.fd)
		if err != nil {
			t.Fatalf("accept %d: %v", i, err)
		}
		defer k.close(fd)
		if key, _, ok := ipKey(sa); !ok || key.String() != "127.0.0.1" {
			t.Errorf("accept %d: peer %v, want 127.0.0.1", i, sa)
		}
		l.noDelay(a, fd)
		on, err := k.noDelay(fd)
		if err != nil || !on {
			t.Errorf("connection %d: TCP_NODELAY %v (%v), want set", i, on, err)
		}
	}
	if a.nodelay != nodelayInherited {
		t.Errorf("acceptor's TCP_NODELAY mode %d, want %d (inherited from the listener)", a.nodelay, nodelayInherited)
	}
	if _, _, err := k.accept(a.fd); err != unix.EAGAIN {
		t.Errorf("accept with an empty queue: %v, want EAGAIN", err)
	}
}
