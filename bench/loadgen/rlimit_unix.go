//go:build linux || darwin

package main

import (
	"fmt"
	"syscall"
)

// raiseFileLimit raises the soft limit on open files (RLIMIT_NOFILE) to the
// hard limit if it is below need, and fails if the hard limit is.
func raiseFileLimit(need uint64) error {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("reading the open files limit: %w", err)
	}
	if rl.Cur >= need {
		return nil
	}
	if rl.Max < need {
		return fmt.Errorf("-conns needs about %d open files, but the hard limit is %d (ulimit -Hn): lower -conns or raise the limit", need, rl.Max)
	}
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("raising the open files limit to %d: %w", rl.Max, err)
	}
	return nil
}
