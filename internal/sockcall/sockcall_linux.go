// Package sockcall makes recv(2) and send(2) on a socket descriptor, with
// no address, for the event loop (package loop).
//
// On a socket, recv(fd, p, 0) and send(fd, p, 0) reach the same socket
// code as read(2) and write(2) (sock_recvmsg and sock_sendmsg), and skip
// the file layer above it that read and write go through: vfs_read and
// vfs_write, their permission hooks, the kiocb that sock_read_iter and
// sock_write_iter build, fsnotify. (One difference the loop never meets:
// a read of zero bytes returns 0 at once, where recv of zero bytes goes
// down to the protocol.) send also takes flags, MSG_NOSIGNAL among them.
//
// golang.org/x/sys/unix has neither call in this form. Its Recvfrom asks
// for the sender's address, which the kernel copies out for every read
// (and, from a Unix socket whose peer is bound, Recvfrom converts into a
// new Sockaddr); its Sendto does not return the count written, which a
// partial write on a non-blocking socket needs; its SendmsgN does, at the
// cost of a msghdr the kernel copies in. So both calls are made here,
// with unix.Syscall6, and with the race detector's annotations that
// unix.Read and unix.Write make (race.go): under -race, a handler that
// keeps the loop's read buffer past OnData, or writes to a buffer the
// loop is sending, is reported as it is with the goroutine driver. The
// package is the only one of the loop's that converts a pointer for a
// system call, as x/sys does (loop's TestNoBackdoor checks that loop
// itself imports neither unsafe nor reflect, and that this package imports
// nothing of sockfsm).
package sockcall

import "unsafe"

// ioSync is what the race detector's annotations synchronize on, as
// x/sys's: data written to a socket by one goroutine and read from it by
// another is ordered by the I/O.
var ioSync int64

// Recv is recv(fd, p, flags): recvfrom(2) with no address. Like unix.Read,
// it returns -1 with an error.
func Recv(fd int, p []byte, flags int) (int, error) {
	n, err := recv(fd, p, flags)
	if raceEnabled {
		if n > 0 {
			raceWriteRange(unsafe.Pointer(unsafe.SliceData(p)), n)
		}
		if err == nil {
			raceAcquire(unsafe.Pointer(&ioSync))
		}
	}
	return n, err
}

// Send is send(fd, p, flags): sendto(2) with no address. Like unix.Write,
// it returns -1 with an error.
func Send(fd int, p []byte, flags int) (int, error) {
	if raceEnabled {
		raceReleaseMerge(unsafe.Pointer(&ioSync))
	}
	n, err := send(fd, p, flags)
	if raceEnabled && n > 0 {
		raceReadRange(unsafe.Pointer(unsafe.SliceData(p)), n)
	}
	return n, err
}
