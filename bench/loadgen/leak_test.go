package main

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if a goroutine outlives the tests. With serverEnv
// set, the binary is TestIdleShutdown's child server instead.
func TestMain(m *testing.M) {
	if kind := os.Getenv(serverEnv); kind != "" {
		os.Exit(childServer(kind))
	}
	goleak.VerifyTestMain(m)
}
