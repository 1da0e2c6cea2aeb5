package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sockfsm/sockfsm"
)

// Defaults of Proxy.
const (
	DefaultMaxBuffer    = 64 << 10
	DefaultWriteTimeout = 60 * time.Second
	DefaultDialTimeout  = 10 * time.Second
)

// Proxy relays each client connection of a sockfsm.Server to a connection
// of its own to the upstream, byte for byte and in both directions, with
// bounded memory and half-closes carried through:
//
//   - client → upstream: OnData copies the input into a buffer of at most
//     MaxBuffer bytes (plus one read), owned by a goroutine that writes it to
//     the upstream; when the buffer is full the handler calls PauseRead, and
//     the writer calls ResumeRead once it has drained. The client's FIN
//     (OnPeerClose) becomes CloseWrite on the upstream connection, after the
//     buffered input.
//   - upstream → client: a goroutine reads the upstream and calls Conn.Write;
//     on sockfsm.ErrOutputFull it stops reading the upstream until OnDrain.
//     The upstream's FIN becomes Conn.CloseWrite, after its data; an
//     upstream error aborts the client (RST).
//
// The handler holds its connection (Conn.Hold): after the client's FIN the
// engine keeps our side open, so that the upstream's answer still reaches
// the client, until the reader closes it. Set the fields before the first
// connection; do not copy a Proxy after.
type Proxy struct {
	// Upstream is the address dialed for each client.
	Upstream string
	// Dial dials the upstream. Default: a net.Dialer with a timeout of
	// DefaultDialTimeout.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxBuffer bounds the client's input held for the upstream before the
	// client is paused. Default DefaultMaxBuffer.
	MaxBuffer int
	// WriteTimeout bounds each write to the upstream: an upstream that
	// takes nothing for that long gets the client aborted. (While the
	// client is paused its IdleTimeout does not run: this is the bound.)
	// Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// Logger receives the proxy's logs. Default: slog.Default().
	Logger *slog.Logger

	stats struct {
		maxToUpstream, maxToClient, pauses, fulls atomic.Int64
	}
}

// Stats are the proxy's counters, over all its connections.
type Stats struct {
	// MaxToUpstream is the most client input ever held for the upstream by
	// one connection: at most MaxBuffer plus one read (Config.ReadBufferSize).
	MaxToUpstream int64
	// MaxToClient is the most upstream output ever queued for one client
	// (Conn.Buffered): at most Config.MaxPendingOutput.
	MaxToClient int64
	// Pauses counts the times a client's reading was paused because the
	// upstream did not take its input fast enough.
	Pauses int64
	// Fulls counts the times a client's output was full, so the upstream's
	// reading stopped until OnDrain.
	Fulls int64
}

// Stats returns the proxy's counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		MaxToUpstream: p.stats.maxToUpstream.Load(),
		MaxToClient:   p.stats.maxToClient.Load(),
		Pauses:        p.stats.pauses.Load(),
		Fulls:         p.stats.fulls.Load(),
	}
}

func (p *Proxy) maxBuffer() int {
	if p.MaxBuffer > 0 {
		return p.MaxBuffer
	}
	return DefaultMaxBuffer
}

func (p *Proxy) writeTimeout() time.Duration {
	if p.WriteTimeout > 0 {
		return p.WriteTimeout
	}
	return DefaultWriteTimeout
}

func (p *Proxy) logger() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

func (p *Proxy) dial(ctx context.Context) (net.Conn, error) {
	if p.Dial != nil {
		return p.Dial(ctx, "tcp", p.Upstream)
	}
	d := net.Dialer{Timeout: DefaultDialTimeout}
	return d.DialContext(ctx, "tcp", p.Upstream)
}

// NewHandler returns the handler of a new client connection: use it as
// sockfsm.Server.NewHandler.
func (p *Proxy) NewHandler(info sockfsm.ConnInfo) sockfsm.Handler {
	ctx, cancel := context.WithCancel(context.Background())
	return &proxyConn{
		p:       p,
		info:    info,
		ctx:     ctx,
		cancel:  cancel,
		wake:    make(chan struct{}, 1),
		drained: make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
}

// raise records v in a high-water mark.
func raise(m *atomic.Int64, v int64) {
	for {
		old := m.Load()
		if v <= old || m.CompareAndSwap(old, v) {
			return
		}
	}
}

// notify posts a wake-up on a channel of capacity 1, without blocking.
func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// proxyConn is one client connection and its upstream connection.
type proxyConn struct {
	p      *Proxy
	info   sockfsm.ConnInfo
	c      *sockfsm.Conn // set by OnOpen
	ctx    context.Context
	cancel context.CancelFunc // ends the dial
	wg     sync.WaitGroup     // the upstream goroutines

	wake    chan struct{} // the writer has input, or the client's FIN, to handle
	drained chan struct{} // OnDrain → the reader
	done    chan struct{} // closed by OnClose

	mu       sync.Mutex
	up       net.Conn // set once dialed
	closed   bool     // OnClose ran: the upstream is closed
	buf      []byte   // client input not yet taken by the writer
	spare    []byte   // the writer's other buffer
	inflight int      // bytes the writer is writing to the upstream
	paused   bool     // the client's reading is paused: buf is full
	fin      bool     // the client's FIN: half-close the upstream after buf
}

// OnOpen holds the connection and starts dialing the upstream, on a
// goroutine of its own.
func (pc *proxyConn) OnOpen(c *sockfsm.Conn) {
	pc.c = c
	// After the client's FIN, keep our side open until the upstream's FIN
	// (or an error) has been relayed: the reader always ends with
	// CloseWrite or Abort.
	c.Hold()
	pc.wg.Add(1)
	go pc.upstream()
}

// OnData hands the client's input to the upstream writer, and pauses the
// client when the writer's buffer is full. It never blocks.
func (pc *proxyConn) OnData(c *sockfsm.Conn, p []byte) {
	pc.mu.Lock()
	pc.buf = append(pc.buf, p...)
	held := len(pc.buf) + pc.inflight
	if held >= pc.p.maxBuffer() && !pc.paused {
		pc.paused = true
		c.PauseRead() // under mu: the writer's ResumeRead cannot come first
		pc.p.stats.pauses.Add(1)
	}
	pc.mu.Unlock()
	raise(&pc.p.stats.maxToUpstream, int64(held))
	notify(pc.wake)
}

// OnPeerClose carries the client's FIN to the upstream: the writer
// half-closes it after the buffered input. Our side stays open (Hold).
func (pc *proxyConn) OnPeerClose(*sockfsm.Conn) {
	pc.mu.Lock()
	pc.fin = true
	pc.mu.Unlock()
	notify(pc.wake)
}

// OnDrain lets the reader write to the client again.
func (pc *proxyConn) OnDrain(*sockfsm.Conn) { notify(pc.drained) }

// OnClose closes the upstream connection and waits for the upstream
// goroutines.
func (pc *proxyConn) OnClose(*sockfsm.Conn, sockfsm.CloseInfo) {
	close(pc.done)
	pc.cancel()
	pc.mu.Lock()
	pc.closed = true
	up := pc.up
	pc.mu.Unlock()
	if up != nil {
		up.Close()
	}
	pc.wg.Wait()
}

// upstream dials the upstream, then runs the reader and the writer.
func (pc *proxyConn) upstream() {
	defer pc.wg.Done()
	up, err := pc.p.dial(pc.ctx)
	if err != nil {
		pc.p.logger().Warn("cannot reach the upstream", "conn", pc.info.ID, "upstream", pc.p.Upstream, "err", err)
		// An RST tells the client its request was not served; a FIN would
		// look like an empty answer.
		pc.c.Abort(fmt.Errorf("proxy: dial upstream: %w", err))
		return
	}
	pc.mu.Lock()
	closed := pc.closed
	if !closed {
		pc.up = up
	}
	pc.mu.Unlock()
	if closed {
		up.Close()
		return
	}
	pc.wg.Add(1)
	go pc.read(up)
	pc.write(up)
}

// write copies the client's input to the upstream, then half-closes the
// upstream after the client's FIN.
func (pc *proxyConn) write(up net.Conn) {
	maxBuf := pc.p.maxBuffer()
	for {
		pc.mu.Lock()
		for len(pc.buf) == 0 && !pc.fin {
			pc.mu.Unlock()
			select {
			case <-pc.wake:
			case <-pc.done:
				return
			}
			pc.mu.Lock()
		}
		chunk, fin := pc.buf, pc.fin
		pc.buf, pc.spare = pc.spare[:0], nil
		pc.inflight = len(chunk)
		pc.mu.Unlock()

		if len(chunk) > 0 {
			up.SetWriteDeadline(time.Now().Add(pc.p.writeTimeout()))
			if _, err := up.Write(chunk); err != nil {
				pc.upstreamFailed(up, "write", err)
				return
			}
		}

		pc.mu.Lock()
		pc.spare, pc.inflight = chunk[:0], 0
		if pc.paused && len(pc.buf) <= maxBuf/2 {
			pc.paused = false
			pc.c.ResumeRead() // under mu: see OnData
		}
		pc.mu.Unlock()
		if fin {
			// Everything the client sent before its FIN is written: carry
			// the FIN on.
			if cw, ok := up.(interface{ CloseWrite() error }); ok {
				if err := cw.CloseWrite(); err != nil {
					pc.upstreamFailed(up, "half-close", err)
				}
			}
			return
		}
	}
}

// read copies the upstream's output to the client, then carries the
// upstream's FIN on with CloseWrite. It always ends by closing our side,
// or finding it closing: the connection is held (see OnOpen).
func (pc *proxyConn) read(up net.Conn) {
	defer pc.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := up.Read(buf)
		if n > 0 && !pc.relay(buf[:n]) {
			return // our side is closing: nothing more can be sent
		}
		if err == io.EOF {
			pc.c.CloseWrite() // after what was written: our FIN to the client
			return
		}
		if err != nil {
			pc.upstreamFailed(up, "read", err)
			return
		}
	}
}

// relay writes p to the client, waiting for OnDrain whenever its output is
// full. It reports false if the client can take nothing more.
func (pc *proxyConn) relay(p []byte) bool {
	for {
		n, err := pc.c.Write(p)
		raise(&pc.p.stats.maxToClient, int64(pc.c.Buffered()))
		if err == nil {
			return true
		}
		if !errors.Is(err, sockfsm.ErrOutputFull) {
			return false // ErrShutdown
		}
		p = p[n:]
		pc.p.stats.fulls.Add(1)
		select {
		case <-pc.drained:
		case <-pc.done:
			return false
		}
	}
}

// upstreamFailed aborts the client after an upstream error, unless the
// connection is already closed on our side.
func (pc *proxyConn) upstreamFailed(up net.Conn, op string, err error) {
	select {
	case <-pc.done: // OnClose closed the upstream
	default:
		pc.p.logger().Info("upstream failed; aborting the client", "conn", pc.info.ID, "op", op, "err", err)
		pc.c.Abort(fmt.Errorf("proxy: upstream %s: %w", op, err))
	}
	up.Close()
}
