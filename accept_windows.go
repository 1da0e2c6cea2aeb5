package sockfsm

import "syscall"

// platformAcceptErrors are Windows' own codes for running out of sockets or
// buffers (WSAEMFILE, WSAENOBUFS): the syscall package's EMFILE and ENOBUFS
// are made-up values there that accept never returns.
var platformAcceptErrors = []syscall.Errno{10024, 10055}
