//go:build 386 || s390x

package sockcall

import "golang.org/x/sys/unix"

// On 386 and s390x, Linux has had recvfrom and sendto as system calls of
// their own only since 4.3 (before, they are socketcall's, which x/sys
// uses there), and Go supports older kernels; x/sys's calls serve.

func recv(fd int, p []byte, flags int) (int, error) {
	n, _, err := unix.Recvfrom(fd, p, flags)
	if err != nil {
		return -1, err
	}
	return n, nil
}

func send(fd int, p []byte, flags int) (int, error) {
	n, err := unix.SendmsgN(fd, p, nil, nil, flags)
	if err != nil {
		return -1, err
	}
	return n, nil
}
