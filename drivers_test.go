package sockfsm_test

import (
	"testing"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/drivertest"
)

// TestDrivers runs the real-socket suite every driver passes
// (internal/drivertest) against the goroutine driver, sockfsm.Server.
func TestDrivers(t *testing.T) {
	drivers := []struct {
		name string
		new  drivertest.Factory
	}{
		{"goroutine", func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) drivertest.Server {
			return &sockfsm.Server{Config: cfg, NewHandler: nh}
		}},
	}
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) { drivertest.Run(t, d.new) })
	}
}
