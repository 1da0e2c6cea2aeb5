//go:build !windows

package sockfsm

import "syscall"

// platformAcceptErrors adds nothing outside Windows: see accept_windows.go.
var platformAcceptErrors []syscall.Errno
