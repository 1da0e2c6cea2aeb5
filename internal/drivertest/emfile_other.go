//go:build !linux

package drivertest

import "testing"

// testEMFILE needs /proc and Linux's RLIMIT_NOFILE semantics.
func testEMFILE(t *testing.T, _ Factory) {
	t.Skip("needs /proc and Linux's RLIMIT_NOFILE semantics")
}
