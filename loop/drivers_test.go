package loop

import (
	"net"
	"testing"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/drivertest"
)

// TestDrivers runs the real-socket suite every driver passes
// (internal/drivertest) against the loop driver, with two loops.
func TestDrivers(t *testing.T) {
	drivertest.Run(t, func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) drivertest.Server {
		return &Server{Config: cfg, NewHandler: nh, Loops: 2}
	})
}

// TestDriversWithPrelude runs the same suite with a Config.Prelude that
// reads nothing and returns its connection: every connection goes through
// the prelude's goroutine and back to a loop (prelude_linux.go), so every
// promise of the suite holds on that path too, EMFILE's back-off included.
func TestDriversWithPrelude(t *testing.T) {
	drivertest.Run(t, func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) drivertest.Server {
		cfg.Prelude = func(c net.Conn) (net.Conn, error) { return c, nil }
		return &Server{Config: cfg, NewHandler: nh, Loops: 2}
	})
}
