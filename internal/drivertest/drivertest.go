// Package drivertest is the real-socket test suite that every sockfsm
// driver passes: the goroutine driver behind sockfsm.Server, and any other
// (an event loop) that offers the same Server methods. Like
// golang.org/x/net/nettest, it is a package of tests that a _test.go file
// runs:
//
//	func TestDrivers(t *testing.T) {
//		drivertest.Run(t, func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) drivertest.Server {
//			return &sockfsm.Server{Config: cfg, NewHandler: nh}
//		})
//	}
//
// Every test talks to the server over loopback TCP (127.0.0.1, and ::1
// where available) and checks what a client can observe (the bytes, EOF
// against a reset) and what the server reports (the CloseInfo through
// Config.OnClose, the state changes through Config.OnStateChange, its
// log through Config.Logger). Each one ends by checking that the server
// has no connection left (NumConns), that no goroutine outlived it
// (goleak) and that no file descriptor was leaked (/proc/self/fd, on
// Linux).
//
// No test asserts how long anything took. The servers' timeouts are short
// so that the suite is fast; every client socket has a deadline and every
// wait is bounded (clientDeadline), so that a bug fails a test instead of
// hanging it, and a watchdog stops the process, with every goroutine's
// stack, if a test outlives testBound. The one measurement, EMFILE's CPU
// time, is a generous bound against a busy loop, not a speed assertion.
//
// What a driver must do to pass, beyond Server's documented promises: log
// accept errors through Config.Logger with the error (EMFILE recognises
// the text "too many open files"), and serve a *net.TCPListener as given.
package drivertest

import (
	"context"
	"net"
	"testing"

	"github.com/sockfsm/sockfsm"
)

// Server is what a driver offers: sockfsm.Server satisfies it, and so must
// any other driver's server.
type Server interface {
	// Serve accepts connections on the listener until Shutdown or Close,
	// then returns sockfsm.ErrServerClosed; it closes the listener.
	Serve(net.Listener) error
	// Shutdown stops accepting, closes every connection gracefully, aborts
	// what is left when ctx ends, and returns only when every connection
	// is closed.
	Shutdown(context.Context) error
	// Close stops accepting and aborts every connection, and returns when
	// every one is closed.
	Close() error
	// NumConns returns the number of open connections.
	NumConns() int
}

// Factory returns a new server of the driver under test, with this config
// and handler factory. It must not start serving: the suite calls Serve.
type Factory func(cfg sockfsm.Config, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) Server

// suite is every test, in the order they run. Each has subtests of its own
// where it tries a behaviour in several ways.
var suite = []struct {
	name string
	run  func(t *testing.T, f Factory)
}{
	{"TutorialFlow", testTutorialFlow},
	{"UrgentData", testUrgentData},
	{"IdleTimeout", testIdleTimeout},
	{"IdleTimeoutAfterIgnoredInput", testIdleTimeoutAfterIgnoredInput},
	{"LingerNoReset", testLingerNoReset},
	{"LingerBounds", testLingerBounds},
	{"WriteTimeout", testWriteTimeout},
	{"WriteTimeoutExcludesHandlerTime", testWriteTimeoutExcludesHandlerTime},
	{"WriteAfterCloseWrite", testWriteAfterCloseWrite},
	{"MaxPendingOutputBoundary", testMaxPendingOutputBoundary},
	{"HandlerPanic", testHandlerPanic},
	{"ShutdownIdle", testShutdownIdle},
	{"ShutdownBusy", testShutdownBusy},
	{"ShutdownDeadline", testShutdownDeadline},
	{"ShutdownWaitsForAccept", testShutdownWaitsForAccept},
	{"Close", testClose},
	{"ServeAfterShutdown", testServeAfterShutdown},
	{"MaxConns", testMaxConns},
	{"MaxConnsSlotReleasedOnEarlyExit", testMaxConnsSlotReleased},
	{"PeerReset", testPeerReset},
	{"Slowloris", testSlowloris},
	{"Flood", testFlood},
	{"EMFILE", testEMFILE},
}

// Run runs every test of the suite as subtests of t, against servers that
// f makes. The subtests do not run in parallel with each other, and must
// not run in parallel with other tests of the process: their goroutine
// and descriptor checks count the whole process's.
func Run(t *testing.T, f Factory) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) {
			check(t)
			tc.run(t, f)
		})
	}
}
