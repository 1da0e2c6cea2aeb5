// Package sockcall makes recv(2) and send(2) on a socket descriptor, with
// no address, for the event loop (package loop).
//
// On a socket they do what read(2) and write(2) do, from the socket layer
// down, and skip the file layer above it: vfs_read and vfs_write, their
// permission hooks, the kiocb that sock_read_iter and sock_write_iter
// build, fsnotify. Send also takes flags, such as MSG_NOSIGNAL.
//
// golang.org/x/sys/unix has neither call in this form: its Recvfrom asks
// for the sender's address, which a Unix stream socket fills in at every
// read and Recvfrom converts, allocating; its Sendto does not return the
// count written, which a partial write on a non-blocking socket needs. So
// both are made here with unix.Syscall6. They live in a package of their
// own because they need unsafe, which package loop does not import (its
// TestNoBackdoor).
package sockcall

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Recv is recv(fd, p, flags): recvfrom(2) with no address. Like unix.Read,
// it returns -1 with an error.
func Recv(fd int, p []byte, flags int) (int, error) {
	return call(unix.SYS_RECVFROM, fd, p, flags)
}

// Send is send(fd, p, flags): sendto(2) with no address. Like unix.Write,
// it returns -1 with an error.
func Send(fd int, p []byte, flags int) (int, error) {
	return call(unix.SYS_SENDTO, fd, p, flags)
}

func call(trap uintptr, fd int, p []byte, flags int) (int, error) {
	n, _, e := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)), uintptr(flags), 0, 0)
	if e != 0 {
		return int(n), e
	}
	return int(n), nil
}
