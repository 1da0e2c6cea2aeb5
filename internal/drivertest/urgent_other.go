//go:build !linux

package drivertest

import "testing"

// testUrgentData needs Linux's urgent-mark semantics (see urgent_linux.go).
func testUrgentData(t *testing.T, _ Factory) {
	t.Skip("needs Linux's urgent-mark semantics")
}
