//go:build !386 && !s390x

package sockcall

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

func recv(fd int, p []byte, flags int) (int, error) {
	return call(unix.SYS_RECVFROM, fd, p, flags)
}

func send(fd int, p []byte, flags int) (int, error) {
	return call(unix.SYS_SENDTO, fd, p, flags)
}

func call(trap uintptr, fd int, p []byte, flags int) (int, error) {
	n, _, e := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)), uintptr(flags), 0, 0)
	if e != 0 {
		return int(n), e
	}
	return int(n), nil
}
