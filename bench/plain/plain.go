// Package plain is the baseline sockfsm's performance is measured against: a
// goroutine-per-connection TCP echo server written directly on net.TCPConn,
// with the same lifecycle as sockfsm's Echo handler on the engine's defaults
// and none of the engine.
//
// Each connection echoes every chunk it reads. On the peer's FIN it
// half-closes (our FIN) and closes. On the idle timeout, or when the server
// shuts down, it half-closes, then lingers: it reads and discards until the
// peer's FIN, bounded per read (LingerTimeout), in total time (LingerTime)
// and in bytes (LingerBytes), and closes. A write that times out or fails, a
// read error and the peer's reset close the connection with RST, as the
// engine does. Every deadline is set before each read and each write, as the
// engine's driver does.
//
// The command bench/plainecho serves it; bench_test.go's BenchmarkEchoTCP
// and bench/compare.sh compare it with cmd/server.
package plain

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The defaults, the same as sockfsm's.
const (
	DefaultIdleTimeout   = 60 * time.Second
	DefaultWriteTimeout  = 60 * time.Second
	DefaultLingerTimeout = 5 * time.Second
	DefaultLingerTime    = 30 * time.Second
	DefaultLingerBytes   = 1 << 20
	DefaultBufferSize    = 16 << 10
)

// Config holds a connection's bounds. Zero means the default.
type Config struct {
	IdleTimeout   time.Duration // no input for this long: half-close, linger, close
	WriteTimeout  time.Duration // a write not done within this long: RST
	LingerTimeout time.Duration // after our FIN, per read
	LingerTime    time.Duration // after our FIN, in total
	LingerBytes   int64         // after our FIN, bytes read and discarded
	BufferSize    int           // the read buffer, allocated per connection
}

func (c Config) withDefaults() Config {
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.IdleTimeout, DefaultIdleTimeout)
	def(&c.WriteTimeout, DefaultWriteTimeout)
	def(&c.LingerTimeout, DefaultLingerTimeout)
	def(&c.LingerTime, DefaultLingerTime)
	if c.LingerBytes <= 0 {
		c.LingerBytes = DefaultLingerBytes
	}
	if c.BufferSize <= 0 {
		c.BufferSize = DefaultBufferSize
	}
	return c
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("plain: server closed")

// past is a deadline in the past, used to wake a blocked read.
var past = time.Unix(1, 0)

// Server is a plain echo server. Set Config before the first call to Serve.
type Server struct {
	Config Config

	closing atomic.Bool
	serving sync.WaitGroup // Serve loops; Add only under mu while not closing
	wg      sync.WaitGroup // connection goroutines; Add only from Serve loops

	mu    sync.Mutex
	lns   map[net.Listener]struct{}
	conns map[*net.TCPConn]struct{}
}

// Serve accepts connections on ln and echoes on each from its own goroutine,
// until Shutdown. It closes ln and returns ErrServerClosed after Shutdown.
// Temporary accept errors are retried after a back-off from 5 ms doubling up
// to 1 s, as sockfsm's Server does.
func (s *Server) Serve(ln net.Listener) error {
	cfg := s.Config.withDefaults()
	s.mu.Lock()
	if s.lns == nil {
		s.lns = map[net.Listener]struct{}{}
		s.conns = map[*net.TCPConn]struct{}{}
	}
	if s.closing.Load() {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.lns[ln] = struct{}{}
	s.serving.Add(1)
	s.mu.Unlock()
	defer s.serving.Done()
	defer ln.Close()

	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) &&
				!errors.Is(err, syscall.ECONNABORTED) && !(errors.As(err, &ne) && ne.Timeout()) {
				return err
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		s.mu.Lock()
		s.conns[tc] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			serveConn(tc, &cfg, &s.closing)
			s.mu.Lock()
			delete(s.conns, tc)
			s.mu.Unlock()
		}()
	}
}

// Shutdown stops accepting and wakes every connection's read, so that each
// half-closes, lingers and closes as on its idle timeout; a connection
// already lingering lingers on. If ctx ends first, the connections still
// open are closed with RST. It returns when every Serve loop and connection
// goroutine has returned: nil, or ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
	s.serving.Wait() // every accepted connection is now registered
	s.mu.Lock()
	for c := range s.conns {
		c.SetReadDeadline(past)
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		c.SetLinger(0)
		c.Close()
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

// NumConns returns the number of open connections.
func (s *Server) NumConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Outcome says how ServeConn's connection ended.
type Outcome uint8

// The outcomes.
const (
	// PeerClosed: the peer's FIN came first; we answered with ours and closed.
	PeerClosed Outcome = iota
	// Lingered: we half-closed (idle timeout or shutdown), lingered, closed.
	Lingered
	// Aborted: closed with RST after an error, a reset or a write timeout.
	Aborted
)

// ServeConn echoes on c until it is closed, and closes it. closing, if not
// nil, is the server's shutdown flag: once it is set the next read ends the
// echo and starts the graceful close. It is exported for tests and
// benchmarks; Server calls it for every connection.
func ServeConn(c *net.TCPConn, cfg Config, closing *atomic.Bool) Outcome {
	cfg = cfg.withDefaults()
	return serveConn(c, &cfg, closing)
}

func serveConn(c *net.TCPConn, cfg *Config, closing *atomic.Bool) Outcome {
	buf := make([]byte, cfg.BufferSize)
	peerFIN := false
	for {
		c.SetReadDeadline(time.Now().Add(cfg.IdleTimeout))
		if closing != nil && closing.Load() {
			break // set after Shutdown woke reads: stop now, not in a minute
		}
		n, err := c.Read(buf)
		if n > 0 {
			c.SetWriteDeadline(time.Now().Add(cfg.WriteTimeout))
			if _, werr := c.Write(buf[:n]); werr != nil {
				return abort(c)
			}
		}
		if err == nil {
			continue
		}
		if err == io.EOF {
			peerFIN = true
			break
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break // idle timeout or shutdown: close gracefully
		}
		return abort(c)
	}
	if err := c.CloseWrite(); err != nil {
		return abort(c)
	}
	if peerFIN {
		c.Close()
		return PeerClosed
	}
	return linger(c, buf, cfg)
}

// linger reads and discards until the peer's FIN, within cfg's bounds, and
// closes c.
func linger(c *net.TCPConn, buf []byte, cfg *Config) Outcome {
	end := time.Now().Add(cfg.LingerTime)
	var read int64
	for read < cfg.LingerBytes {
		dl := time.Now().Add(cfg.LingerTimeout)
		if end.Before(dl) {
			dl = end
		}
		c.SetReadDeadline(dl)
		n, err := c.Read(buf)
		// Shutdown's wake-up (a read deadline in the past) is for the echo
		// loop, but it lands here when the connection was already lingering
		// (on its idle timeout, or having seen the closing flag before
		// Shutdown got to it): this read's own deadline has not come. Re-arm
		// it and read on. Each Shutdown call wakes a connection once.
		for n == 0 && errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(dl) {
			c.SetReadDeadline(dl)
			n, err = c.Read(buf)
		}
		read += int64(n)
		if err == io.EOF || errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			return abort(c)
		}
	}
	c.Close()
	return Lingered
}

func abort(c *net.TCPConn) Outcome {
	c.SetLinger(0)
	c.Close()
	return Aborted
}
