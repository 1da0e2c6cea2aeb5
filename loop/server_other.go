//go:build !linux

package loop

import (
	"context"
	"log/slog"
	"net"
	"runtime"
	"sync"

	"github.com/sockfsm/sockfsm"
)

// serverState, where there is no event loop, is the goroutine driver's
// Server, configured from the fields on first use.
type serverState struct {
	once sync.Once
	srv  sockfsm.Server
}

func (s *Server) fallback() *sockfsm.Server {
	s.impl.once.Do(func() {
		s.impl.srv.Config = s.Config
		s.impl.srv.NewHandler = s.NewHandler
		log := s.Config.Logger
		if log == nil {
			log = slog.Default()
		}
		log.Info("sockfsm/loop: no event loop on " + runtime.GOOS + "; serving with the goroutine driver (sockfsm.Server)")
	})
	return &s.impl.srv
}

// Serve accepts connections on ln and serves them; see sockfsm.Server.Serve.
// It refuses the listeners the Linux loop refuses, so that a program
// behaves the same on every system.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.check(ln); err != nil {
		ln.Close()
		return err
	}
	return s.fallback().Serve(ln)
}

// Shutdown stops the server gracefully; see sockfsm.Server.Shutdown.
func (s *Server) Shutdown(ctx context.Context) error { return s.fallback().Shutdown(ctx) }

// Close aborts every connection; see sockfsm.Server.Close.
func (s *Server) Close() error { return s.fallback().Close() }

// NumConns returns the number of open connections.
func (s *Server) NumConns() int { return s.fallback().NumConns() }
