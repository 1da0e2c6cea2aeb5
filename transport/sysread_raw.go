//go:build linux && !race && !msan && !asan

package transport

import (
	"syscall"
	"unsafe"
)

// sysRead is read(2) on a non-blocking descriptor. It is a raw system call:
// the call cannot block (net's descriptors stay non-blocking; File gives a
// duplicate), so the scheduler need not hear of it, and the goroutine's
// stack stays shallow (TestIdleConnectionStack). Under the race detector,
// msan or asan, syscall.Read is used instead, which tells them what the
// kernel wrote.
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
