package loop

import (
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
