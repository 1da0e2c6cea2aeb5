//go:build unix

package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/pires/go-proxyproto"
)

// peekSignature reports whether c's input begins with a PROXY header's
// signature, without consuming anything: it peeks (MSG_PEEK) and, while what
// has arrived is a prefix of a signature, waits for more. c's read deadline
// bounds the wait.
func peekSignature(c net.Conn) (bool, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false, errors.New("proxy: optional mode needs a connection that can peek (a syscall.Conn)")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, err
	}
	var buf [12]byte // len(SIGV2)
	var present bool
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		var n int
		var e error
		for {
			n, _, e = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK)
			if e != syscall.EINTR {
				break
			}
		}
		switch {
		case e == syscall.EAGAIN || e == syscall.EWOULDBLOCK:
			return false // nothing yet: wait
		case e != nil:
			perr = e
			return true
		case n == 0:
			perr = io.EOF
			return true
		}
		p := buf[:n]
		v1 := bytes.HasPrefix(proxyproto.SIGV1, p[:min(n, len(proxyproto.SIGV1))])
		v2 := bytes.HasPrefix(proxyproto.SIGV2, p)
		switch {
		case v1 && n >= len(proxyproto.SIGV1), v2 && n == len(proxyproto.SIGV2):
			present = true
			return true
		case !v1 && !v2:
			return true // not a header
		}
		return false // a signature's prefix so far: wait for more
	})
	if err != nil {
		return false, err
	}
	return present, perr
}
