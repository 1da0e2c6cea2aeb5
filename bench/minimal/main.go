// Command minimal is the floor of bench/compare.sh: the smallest
// goroutine-per-connection TCP echo server in Go, with no deadlines and no
// graceful close. Each connection's goroutine reads into its own buffer
// (-buffer bytes, io.Copy's 32 KiB by default) and writes back what it read,
// until a read fails; at the peer's FIN (EOF) or any error it closes the
// connection.
//
// It copies with a plain Read/Write loop rather than io.Copy(c, c): on Linux
// io.Copy between two TCP connections splices through a pipe, which holds
// two more descriptors per connection while it waits to read, and a process
// here may open 20,000 files in all.
//
// Usage:
//
//	minimal [-addr 127.0.0.1:27017] [-buffer 32768]
//
// It listens on loopback addresses only, and logs "listening" with the
// address to stderr (with port 0 the address is the one chosen). SIGINT or
// SIGTERM closes the listener and every connection at once (a FIN when no
// input is left unread, as for an idle connection), waits for the
// connections' goroutines, and exits 0.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/sockfsm/sockfsm/bench/internal/probe"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stderr, sigs))
}

// server tracks the open connections, to close them at shutdown.
type server struct {
	bufSize int
	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	closed  bool
	wg      sync.WaitGroup
}

// serve accepts until ln is closed.
func (s *server) serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.echo(c)
	}
}

// echo writes back what it reads until a read or a write fails, then closes.
func (s *server) echo(c net.Conn) {
	defer s.wg.Done()
	buf := make([]byte, s.bufSize)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// closeAll closes every connection and waits for their goroutines.
func (s *server) closeAll() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// run is the whole program; it returns the exit code.
func run(args []string, stderr io.Writer, sigs <-chan os.Signal) int {
	fs := flag.NewFlagSet("minimal", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:27017", "loopback `host:port` to listen on")
	bufSize := fs.Int("buffer", 32<<10, "each connection's read buffer, in bytes")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *bufSize < 1 || *bufSize > 1<<24 {
		fmt.Fprintln(stderr, "minimal: unexpected arguments, or -buffer not within 1 to 16 MiB")
		return 2
	}
	if err := probe.CheckLoopback(*addr); err != nil {
		fmt.Fprintf(stderr, "minimal: -addr: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(stderr, "minimal: %v\n", err)
		return 1
	}
	s := &server{bufSize: *bufSize, conns: map[net.Conn]struct{}{}}
	served := make(chan error, 1)
	go func() { served <- s.serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String())

	code := 0
	select {
	case err := <-served:
		log.Error("accept failed", "err", err)
		code = 1
	case sig := <-sigs:
		log.Info("shutting down: closing every connection", "signal", sig.String())
		ln.Close()
		<-served
	}
	s.closeAll()
	log.Info("server stopped")
	return code
}
