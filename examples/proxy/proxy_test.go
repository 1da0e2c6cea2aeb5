package main

// The proxy on a real sockfsm.Server, between real clients and a real
// upstream, over loopback TCP. No test asserts how long anything took; every
// socket has a deadline and every loop and wait is bounded, so that a bug
// fails a test instead of hanging it. The bounds are generous: they are
// there to end a hung test, and the machine may be busy.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"go.uber.org/goleak"
)

// TestMain fails the run if a goroutine outlives the tests: the server's,
// every connection's, and the proxy's upstream readers and writers.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds each wait, and each socket operation: a stall that long
// fails the test.
const deadline = 10 * time.Second

// connDeadline bounds a whole connection's I/O in a test.
const connDeadline = 60 * time.Second

// upstreamServer runs serve for each connection accepted on 127.0.0.1, on
// a goroutine of its own; it stops, and waits for them, when the test ends.
func upstreamServer(t *testing.T, serve func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(connDeadline))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// echoAfterEOF is the upstream of the half-close tests: it reads everything
// until the client's FIN, then sends it all back and closes. readBuf and
// pace, if set, make it a slow reader: a small receive buffer, and a pause
// after each 64 KiB read.
func echoAfterEOF(readBuf int, pace time.Duration) func(c *net.TCPConn) {
	return func(c *net.TCPConn) {
		if readBuf > 0 {
			c.SetReadBuffer(readBuf)
		}
		var got bytes.Buffer
		buf := make([]byte, 16<<10)
		for next := 64 << 10; ; {
			n, err := c.Read(buf)
			got.Write(buf[:n])
			if err != nil {
				if err != io.EOF {
					return // the test fails on the client's side
				}
				break
			}
			if pace > 0 && got.Len() >= next {
				time.Sleep(pace)
				next += 64 << 10
			}
		}
		c.Write(got.Bytes())
	}
}

// proxyServer is a sockfsm.Server running a Proxy to upstream.
type proxyServer struct {
	addr string
	px   *Proxy
	srv  *sockfsm.Server

	mu     sync.Mutex
	closes map[string]sockfsm.CloseInfo // by the client's address
}

// startProxy starts a proxy to upstream on 127.0.0.1. It is shut down when
// the test ends, after the test's clients are closed.
func startProxy(t *testing.T, px *Proxy, cfg sockfsm.Config) *proxyServer {
	t.Helper()
	ps := &proxyServer{px: px, closes: map[string]sockfsm.CloseInfo{}}
	cfg.OnClose = func(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
		ps.mu.Lock()
		ps.closes[c.RemoteAddr.String()] = info
		ps.mu.Unlock()
	}
	ps.srv = &sockfsm.Server{Config: cfg, NewHandler: px.NewHandler}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ps.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- ps.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := ps.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v, want ErrServerClosed", err)
		}
	})
	return ps
}

// closeInfo returns how the proxy's end of c ended, once it has.
func (ps *proxyServer) closeInfo(t *testing.T, c net.Conn) sockfsm.CloseInfo {
	t.Helper()
	for end := time.Now().Add(deadline); ; time.Sleep(5 * time.Millisecond) {
		ps.mu.Lock()
		info, ok := ps.closes[c.LocalAddr().String()]
		ps.mu.Unlock()
		if ok {
			return info
		}
		if time.Now().After(end) {
			t.Fatalf("the proxy did not close %s", c.LocalAddr())
		}
	}
}

// dial connects a client, with a deadline on all its I/O; it is closed
// when the test ends.
func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(connDeadline)); err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// readToEOF reads c until the proxy's FIN; an RST, any other error, or no
// progress for deadline fails the test.
func readToEOF(t *testing.T, c net.Conn) []byte {
	t.Helper()
	return readToEOFWithin(t, c, deadline)
}

// readToEOFWithin is readToEOF with a bound of its own on each wait for
// input.
func readToEOFWithin(t *testing.T, c net.Conn, stall time.Duration) []byte {
	t.Helper()
	var b []byte
	buf := make([]byte, 64<<10)
	for {
		c.SetReadDeadline(time.Now().Add(stall))
		n, err := c.Read(buf)
		b = append(b, buf[:n]...)
		if err == io.EOF {
			return b
		}
		if err != nil {
			t.Fatalf("client read: %v after %d bytes (reset: %v); want the proxy's FIN",
				err, len(b), errors.Is(err, syscall.ECONNRESET))
		}
	}
}

// writeAll writes p to c; no progress for deadline fails the test.
func writeAll(t *testing.T, c net.Conn, p []byte) {
	t.Helper()
	for len(p) > 0 {
		k := min(len(p), 256<<10)
		c.SetWriteDeadline(time.Now().Add(deadline))
		if _, err := c.Write(p[:k]); err != nil {
			t.Fatalf("client write: %v with %d bytes left", err, len(p))
		}
		p = p[k:]
	}
}

// wantGraceful checks that the proxy closed the client's connection without
// an RST, and after its FIN.
func (ps *proxyServer) wantGraceful(t *testing.T, c net.Conn) {
	t.Helper()
	if info := ps.closeInfo(t, c); info.Aborted() || !info.PeerFIN {
		t.Errorf("the proxy closed the client with %v (%v), peer FIN %v; want a graceful close after the client's FIN",
			info.Reason, info.Err, info.PeerFIN)
	}
}

// TestHalfCloseCarriedThrough: the client sends a request in pieces and
// half-closes; the upstream answers only after it has read the client's FIN
// (which the proxy must carry to it). The answer, which comes after the
// client's FIN, still reaches the client, whole, followed by the proxy's FIN
// (not a reset).
func TestHalfCloseCarriedThrough(t *testing.T) {
	up := upstreamServer(t, echoAfterEOF(0, 0))
	ps := startProxy(t, &Proxy{Upstream: up}, sockfsm.Config{})
	c := dial(t, ps.addr)
	want := []byte(strings.Repeat("this is a test. ", 1000))
	for p := want; len(p) > 0; {
		k := min(len(p), 1000)
		if _, err := c.Write(p[:k]); err != nil {
			t.Fatal(err)
		}
		p = p[k:]
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got := readToEOF(t, c); !bytes.Equal(got, want) {
		t.Fatalf("client received %d bytes, want the %d it sent", len(got), len(want))
	}
	c.Close()
	ps.wantGraceful(t, c)
}

// TestBackpressure: a client sends 8 MiB, as fast as it can, to an upstream
// that reads slowly. The proxy holds at most MaxBuffer plus one read of the
// client's input: it pauses reading the client (at least once) instead of
// buffering. The upstream then sends the 8 MiB back after the client's FIN;
// the client's output fills (at least once) and the proxy waits for it to
// drain, holding at most MaxPendingOutput. Every byte arrives intact both
// ways, and the exchange ends with FINs.
func TestBackpressure(t *testing.T) {
	const (
		size       = 8 << 20
		maxBuffer  = 64 << 10
		readBuf    = 16 << 10
		maxPending = 64 << 10
	)
	up := upstreamServer(t, echoAfterEOF(16<<10, time.Millisecond))
	px := &Proxy{
		Upstream:  up,
		MaxBuffer: maxBuffer,
		// A small send buffer toward the upstream, so that the kernel does
		// not absorb what the proxy must hold back.
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				err = c.(*net.TCPConn).SetWriteBuffer(16 << 10)
			}
			return c, err
		},
	}
	ps := startProxy(t, px, sockfsm.Config{ReadBufferSize: readBuf, MaxPendingOutput: maxPending})
	c := dial(t, ps.addr)

	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + i>>13)
	}
	writeAll(t, c, data)
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// Much of the input may still be in the kernel's buffers when the
	// client's writes return, and the upstream answers only once it has
	// read it all: the first byte back may take a while on a busy machine.
	got := readToEOFWithin(t, c, connDeadline)
	if len(got) != size || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("client received %d bytes back, want the %d it sent, intact", len(got), size)
	}
	c.Close()
	ps.wantGraceful(t, c)

	st := px.Stats()
	if st.Pauses < 1 {
		t.Errorf("the client was never paused (Stats %+v): the slow upstream did not push back", st)
	}
	if st.MaxToUpstream > maxBuffer+readBuf {
		t.Errorf("the proxy held %d bytes for the upstream, want at most MaxBuffer + ReadBufferSize = %d", st.MaxToUpstream, maxBuffer+readBuf)
	}
	if st.Fulls < 1 {
		t.Errorf("the client's output was never full (Stats %+v): the answer did not push back", st)
	}
	if st.MaxToClient > maxPending {
		t.Errorf("the proxy queued %d bytes for the client, want at most MaxPendingOutput = %d", st.MaxToClient, maxPending)
	}
}

// TestUpstreamClosesFirst: the upstream sends a greeting and closes at
// once. The client receives the greeting, then the proxy's FIN (not a
// reset), before it has sent or closed anything.
func TestUpstreamClosesFirst(t *testing.T) {
	const greeting = "220 hello, and goodbye\r\n"
	up := upstreamServer(t, func(c *net.TCPConn) { c.Write([]byte(greeting)) })
	ps := startProxy(t, &Proxy{Upstream: up}, sockfsm.Config{})
	c := dial(t, ps.addr)
	if got := string(readToEOF(t, c)); got != greeting {
		t.Fatalf("client received %q, want %q", got, greeting)
	}
	c.Close()
	ps.wantGraceful(t, c)
}

// TestUpstreamUnreachable: when the upstream cannot be dialed, the client
// is reset rather than given an empty answer. (The reset may even come
// before the client's connect has returned.)
func TestUpstreamUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close() // nothing listens there now
	ps := startProxy(t, &Proxy{Upstream: closedAddr}, sockfsm.Config{})
	c, err := net.DialTimeout("tcp", ps.addr, deadline)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("dial: %v, want success or a reset", err)
		}
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(connDeadline))
	if _, err := io.ReadAll(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read: %v, want a reset", err)
	}
	if info := ps.closeInfo(t, c); info.Reason != sockfsm.ReasonHandlerAbort {
		t.Errorf("the proxy closed the client with %v, want handler-abort", info.Reason)
	}
}

// TestRun runs the program against an upstream: one exchange, then exit 0
// after a signal.
func TestRun(t *testing.T) {
	up := upstreamServer(t, echoAfterEOF(0, 0))
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	code := make(chan int, 1)
	var stderr testutil.SyncBuffer
	go func() { code <- run([]string{"-listen", "127.0.0.1:0", "-upstream", up}, &stderr, sigs, ready) }()
	var addr net.Addr
	select {
	case addr = <-ready:
	case c := <-code:
		t.Fatalf("run exited %d: %s", c, stderr.String())
	}
	c := dial(t, addr.String())
	if _, err := c.Write([]byte("this is a test")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if got := string(readToEOF(t, c)); got != "this is a test" {
		t.Fatalf("client received %q", got)
	}
	c.Close()
	sigs <- syscall.SIGTERM
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("run exited %d after SIGTERM, want 0: %s", c, stderr.String())
		}
	case <-time.After(deadline):
		t.Fatal("run did not return after SIGTERM")
	}
}

// TestFlags: -upstream is required.
func TestFlags(t *testing.T) {
	var stderr testutil.SyncBuffer
	if c := run([]string{"-listen", "127.0.0.1:0"}, &stderr, nil, nil); c != 2 {
		t.Errorf("run without -upstream exited %d, want 2", c)
	}
}
