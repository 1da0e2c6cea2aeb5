//go:build unix && !(linux && !race && !msan && !asan)

package transport

import "syscall"

// sysRead is read(2) on a non-blocking descriptor.
func sysRead(fd uintptr, p []byte) (int, error) { return syscall.Read(int(fd), p) }
