package sockfsm_test

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/sockfsm/sockfsm"
)

// listenerPipe makes nettest's pipes: c1 is a connection the Listener
// accepted (the engine drives it), c2 the plain TCP client. stop closes
// both and shuts the Listener down, which returns once the engine has
// closed every socket.
func listenerPipe(t *testing.T, cfg sockfsm.Config) nettest.MakePipe {
	return func() (c1, c2 net.Conn, stop func(), err error) {
		l, err := sockfsm.Listen("tcp", "127.0.0.1:0", cfg)
		if err != nil {
			return nil, nil, nil, err
		}
		type accepted struct {
			c   net.Conn
			err error
		}
		ch := make(chan accepted, 1)
		go func() {
			c, err := l.Accept()
			ch <- accepted{c, err}
		}()
		client, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			l.Close()
			<-ch
			return nil, nil, nil, err
		}
		a := <-ch
		if a.err != nil {
			client.Close()
			l.Close()
			return nil, nil, nil, a.err
		}
		stop = func() {
			a.c.Close()
			client.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := l.Shutdown(ctx); err != nil {
				t.Errorf("Listener.Shutdown: %v", err)
			}
		}
		return a.c, client, stop, nil
	}
}

// TestNetConnNettest runs golang.org/x/net/nettest's conformance suite for
// net.Conn over real TCP pairs made with the Listener.
func TestNetConnNettest(t *testing.T) {
	nettest.TestConn(t, listenerPipe(t, sockfsm.Config{
		LingerTimeout: time.Second, LingerTime: 2 * time.Second,
		Logger: slog.New(slog.DiscardHandler),
	}))
}
