package transport

import (
	"syscall"
	"unsafe"
)

// sysRead is read(2) on a non-blocking descriptor. It is a raw system call:
// the call cannot block, so the scheduler need not hear of it, and the
// goroutine's stack stays shallow (TestIdleConnectionStack).
func sysRead(fd uintptr, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(ptr), uintptr(len(p)))
	if errno != 0 {
		return -1, errno
	}
	return int(n), nil
}
