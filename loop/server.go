package loop

import (
	"errors"
	"fmt"
	"net"

	"github.com/sockfsm/sockfsm"
)

// ErrUnsupportedListener is matched by the error Serve returns for a
// listener the event loop cannot serve: anything but a *net.TCPListener or
// a *net.UnixListener (TLS listeners in particular).
var ErrUnsupportedListener = errors.New("sockfsm: the loop driver serves only TCP and Unix listeners (no TLS); use sockfsm.Server")

// Server accepts connections and runs each on the engine with a handler
// from NewHandler, on event loops. It has the API and the promises of
// sockfsm.Server. Set its fields before the first call to Serve; do not
// copy it after.
type Server struct {
	// Config holds the connections' timeouts and limits and MaxConns.
	Config sockfsm.Config
	// NewHandler returns the handler of a new connection. It is called on
	// the accepting loop, or, with a Config.Prelude, on the goroutine of
	// the connection's prelude, so concurrently; it must not block.
	NewHandler func(sockfsm.ConnInfo) sockfsm.Handler
	// Loops is the number of event loops that serve connections; 0 means
	// runtime.GOMAXPROCS(0). One more loop accepts them (see the package
	// doc). Ignored where there is no event loop.
	Loops int

	impl serverState // per platform
}

// ListenAndServe listens on the TCP address addr and calls Serve.
func (s *Server) ListenAndServe(addr string) error {
	if err := s.Config.Validate(); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(ln)
}

// checkListener refuses the listeners the loop cannot serve.
func checkListener(ln net.Listener) error {
	switch ln.(type) {
	case *net.TCPListener, *net.UnixListener:
		return nil
	}
	return fmt.Errorf("%w: %T", ErrUnsupportedListener, ln)
}

// check validates s before serving.
func (s *Server) check(ln net.Listener) error {
	if err := s.Config.Validate(); err != nil {
		return err
	}
	if s.NewHandler == nil {
		return sockfsm.ErrNoHandler
	}
	if s.Loops < 0 {
		return fmt.Errorf("%w: Loops %d is negative", sockfsm.ErrInvalidConfig, s.Loops)
	}
	return checkListener(ln)
}
