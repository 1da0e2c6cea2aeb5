package sockfsm

// Micro-benchmarks of the engine, its driver and the server, and the plain
// goroutine-per-connection baseline (bench/plain) they are compared with.
// docs/performance.md has the numbers and the commands; bench/compare.sh
// compares the servers as processes.
//
// Timing is measured here, never asserted. TestEngineAllocs asserts
// allocation counts, which do not depend on the machine.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/bench/plain"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/transport"
)

// benchChunk is the Winsock tutorial's payload.
var benchChunk = []byte("this is a test")

// benchStep is how far the virtual clock moves per engine call.
const benchStep = time.Microsecond

// benchLogger is a logger like cmd/server's at its default level, Info,
// writing nowhere, tagged per connection as Server tags it.
func benchLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil)).With(slog.Uint64("conn", 1), slog.String("remote", "127.0.0.1:50412"))
}

// echoExchange runs one steady-state echo exchange through e: a 14-byte
// chunk is read, Next asks to write it, the write completes, Next asks to
// read. It returns false if the engine did anything else.
func echoExchange(e *Engine, now time.Time) bool {
	e.ReadDone(now, benchChunk, ResultOK, nil)
	a := e.Next(now)
	if a.Op != OpWrite || len(a.Data) != len(benchChunk) {
		return false
	}
	e.WriteDone(now, len(a.Data), ResultOK, nil)
	return e.Next(now).Op == OpRead
}

// newEchoEngine returns an Echo engine with log as its Logger, started on a
// virtual clock and waiting for its first read, and the clock's time.
func newEchoEngine(tb testing.TB, log *slog.Logger, id uint64) (*Engine, time.Time) {
	tb.Helper()
	e, err := NewEngine(Config{Logger: log}, Echo{}, ConnInfo{ID: id})
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Unix(1_700_000_000, 0)
	e.Start(now)
	if a := e.Next(now); a.Op != OpRead {
		tb.Fatalf("first op %v, want read", a.Op)
	}
	return e, now
}

func benchEngineEchoExchange(b *testing.B, log *slog.Logger) {
	b.ReportAllocs()
	e, now := newEchoEngine(b, log, 1)
	if !echoExchange(e, now) { // warm up: the output buffer is allocated once
		b.Fatal("the engine did not echo")
	}
	for b.Loop() {
		now = now.Add(benchStep)
		if !echoExchange(e, now) {
			b.Fatalf("the engine left the echo loop: state %v", e.State())
		}
	}
}

// BenchmarkEngineEchoExchange is one echo exchange through the Engine, with
// no I/O, in steady state: ReadDone with 14 bytes, Next (OpWrite), WriteDone,
// Next (OpRead), on a virtual clock advanced by a constant step. The Config
// is the zero value (its Logger is NewEngine's default). Target: 0 allocs/op.
func BenchmarkEngineEchoExchange(b *testing.B) { benchEngineEchoExchange(b, nil) }

// BenchmarkEngineEchoExchangeLogger is BenchmarkEngineEchoExchange with a
// per-connection logger at Info, as Server gives every engine: it measures
// what the debug-level check on every transition costs.
func BenchmarkEngineEchoExchangeLogger(b *testing.B) { benchEngineEchoExchange(b, benchLogger()) }

// closeCounter is Echo plus OnClose, to check that the lifecycle ends with it.
type closeCounter struct{ closes int }

func (h *closeCounter) OnData(c *Conn, p []byte)        { c.Write(p) }
func (h *closeCounter) OnClose(_ *Conn, info CloseInfo) { h.closes++ }

// lifecycle drives e through a whole connection: start, one echo, the
// peer's FIN, our half-close, close, OnClose. It returns an error if the
// engine asks for anything else.
func lifecycle(e *Engine, now time.Time) error {
	want := func(a Action, op Op) error {
		if a.Op != op {
			return errors.New("engine asked for " + a.Op.String() + ", want " + op.String())
		}
		return nil
	}
	e.Start(now)
	if err := want(e.Next(now), OpRead); err != nil {
		return err
	}
	if !echoExchange(e, now) {
		return errors.New("no echo")
	}
	e.ReadDone(now, nil, ResultEOF, io.EOF)
	if err := want(e.Next(now), OpCloseWrite); err != nil {
		return err
	}
	e.CloseWriteDone(now, ResultOK, nil)
	if err := want(e.Next(now), OpClose); err != nil {
		return err
	}
	e.CloseDone(now)
	if err := want(e.Next(now), OpDone); err != nil {
		return err
	}
	if info := e.CloseInfo(); info.Reason != ReasonPeerClosed || info.BytesWritten != int64(len(benchChunk)) {
		return errors.New("wrong CloseInfo: " + info.Reason.String())
	}
	return nil
}

// BenchmarkEngineLifecycle is a whole connection's lifecycle through the
// engine, with no I/O: start, one 14-byte echo, the peer's FIN, our
// half-close, close, OnClose. The state table is compiled once, at package
// init (fsm.compiled); a new connection only zeroes an fsm.Machine.
//
//   - NewEngine: the public constructor (Config validated, limits computed).
//   - server: what Server.serve allocates per connection around the engine:
//     the driver (which embeds the Engine) and the per-connection logger,
//     then the same lifecycle. The driver has no transport here, so it
//     borrows a read buffer from the pool at init and gives it back at the
//     end, as over a transport that is not a transport.LazyReader.
func BenchmarkEngineLifecycle(b *testing.B) {
	now := time.Unix(1_700_000_000, 0)
	b.Run("NewEngine", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			h := &closeCounter{}
			e, err := NewEngine(Config{}, h, ConnInfo{ID: 1})
			if err != nil {
				b.Fatal(err)
			}
			if err := lifecycle(e, now); err != nil || h.closes != 1 {
				b.Fatalf("lifecycle: %v, %d closes", err, h.closes)
			}
		}
	})
	b.Run("server", func(b *testing.B) {
		b.ReportAllocs()
		cfg := Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		lim := cfg.limits()
		remote := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50412}
		var id uint64
		for b.Loop() {
			id++
			h := &closeCounter{}
			info := ConnInfo{ID: id, RemoteAddr: remote}
			d := &driver{}
			d.init(nil, lim, h, info, &cfg, time.Now)
			if err := lifecycle(&d.e, now); err != nil || h.closes != 1 {
				b.Fatalf("lifecycle: %v, %d closes", err, h.closes)
			}
			d.releaseBuffer()
		}
	})
}

// BenchmarkLooplabLifecycle is the same lifecycle's events on looplab/fsm,
// built from the same table (fsm.NewReference): what a per-connection
// looplab machine would cost, for comparison with BenchmarkEngineLifecycle.
// It runs only the state machine, not the engine around it.
func BenchmarkLooplabLifecycle(b *testing.B) {
	b.ReportAllocs()
	events := []fsm.Event{fsm.Start, fsm.Input, fsm.Output, fsm.Flushed, fsm.PeerFIN, fsm.HalfClose, fsm.FINSent, fsm.Close, fsm.CloseDone}
	for b.Loop() {
		ref := fsm.NewReference()
		for _, ev := range events {
			if err := fsm.Step(ref, ev); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// TestEngineAllocs checks the engine's allocations, which do not depend on
// the machine: none per echo exchange in steady state, with or without a
// logger, and a few per lifecycle (the Engine and its output buffer): no
// per-connection state table (looplab's NewFSM alone allocates dozens).
func TestEngineAllocs(t *testing.T) {
	for _, log := range []*slog.Logger{nil, benchLogger()} {
		e, err := NewEngine(Config{Logger: log}, Echo{}, ConnInfo{ID: 1})
		if err != nil {
			t.Fatal(err)
		}
		now := time.Unix(1_700_000_000, 0)
		e.Start(now)
		e.Next(now)
		echoExchange(e, now)
		ok := true
		allocs := testing.AllocsPerRun(100, func() {
			now = now.Add(benchStep)
			ok = ok && echoExchange(e, now)
		})
		if !ok {
			t.Fatalf("logger %v: the engine left the echo loop", log != nil)
		}
		if allocs != 0 {
			t.Errorf("logger %v: %v allocations per echo exchange, want 0", log != nil, allocs)
		}
	}
	now := time.Unix(1_700_000_000, 0)
	var lerr error
	allocs := testing.AllocsPerRun(100, func() {
		e, err := NewEngine(Config{}, Echo{}, ConnInfo{ID: 1})
		if err == nil {
			err = lifecycle(e, now)
		}
		if err != nil {
			lerr = err
		}
	})
	if lerr != nil {
		t.Fatal(lerr)
	}
	if allocs > 4 {
		t.Errorf("%v allocations per NewEngine and lifecycle, want at most 4", allocs)
	}
}

// benchRoundTrips does b.N round trips of len(msg) bytes on c, checking
// every byte, then closes c gracefully: our FIN, read to EOF, close.
func benchRoundTrips(b *testing.B, c net.Conn, msg []byte) {
	b.Helper()
	b.ReportAllocs()
	b.SetBytes(int64(2 * len(msg)))
	buf := make([]byte, len(msg))
	deadline := time.Now().Add(10 * time.Minute) // a bound, not a measure
	c.SetDeadline(deadline)
	for b.Loop() {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		if string(buf) != string(msg) {
			b.Fatalf("echo %q, want %q", buf, msg)
		}
	}
	b.StopTimer()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
		b.Errorf("after our FIN: %d bytes, %v; want EOF", n, err)
	}
	c.Close()
}

// BenchmarkEchoPipe is the driver (ServeConn) over an in-memory
// transport.Pipe, with the benchmark's goroutine as the client doing 14-byte
// round trips. Per op: one round trip.
func BenchmarkEchoPipe(b *testing.B) {
	client, server := transport.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan CloseInfo, 1)
	go func() {
		info, _ := ServeConn(ctx, server, Echo{}, Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		done <- info
	}()
	b.Cleanup(func() { // also after a failure: the connection is aborted
		cancel()
		client.Close()
		<-done
	})
	benchRoundTrips(b, client, benchChunk)
	select {
	case info := <-done:
		done <- info
		if info.Reason != ReasonPeerClosed {
			b.Errorf("closed with %v (%v), want peer-closed", info.Reason, info.Err)
		}
	case <-time.After(10 * time.Second):
		b.Error("ServeConn did not return within 10s of the client's close")
	}
}

// BenchmarkEchoTCP is the same 64-byte round trip over one loopback TCP
// connection, against a sockfsm Server (Echo) and against the plain
// goroutine-per-connection server of bench/plain, with the same graceful
// close, in the same run. Per op: one round trip; the client's costs are
// included, and the same in both.
func BenchmarkEchoTCP(b *testing.B) {
	msg := make([]byte, 64)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	b.Run("sockfsm", func(b *testing.B) {
		srv := newEchoServer(0)
		benchTCP(b, msg, srv.Serve, srv.Shutdown, ErrServerClosed)
	})
	b.Run("plain", func(b *testing.B) {
		srv := &plain.Server{}
		benchTCP(b, msg, srv.Serve, srv.Shutdown, plain.ErrServerClosed)
	})
}

// startBenchServer serves on 127.0.0.1 with serve until the benchmark ends,
// then shuts the server down gracefully (in a cleanup, so also after a
// failure) and checks that serve returned closed.
func startBenchServer(b *testing.B, serve func(net.Listener) error, shutdown func(context.Context) error, closed error) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- serve(ln) }()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := shutdown(ctx); err != nil {
			b.Errorf("shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, closed) {
			b.Errorf("serve: %v", err)
		}
	})
	return ln
}

// benchTCP serves on 127.0.0.1 with serve, runs the round trips over one
// connection, and shuts the server down gracefully (in a cleanup, so also
// after a failure).
func benchTCP(b *testing.B, msg []byte, serve func(net.Listener) error, shutdown func(context.Context) error, closed error) {
	ln := startBenchServer(b, serve, shutdown, closed)
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	benchRoundTrips(b, c, msg)
}

// BenchmarkChurnTCP is one whole connection per op over loopback TCP, as
// loadgen's churn mode does it: connect, send 14 bytes, half-close, read the
// echo to EOF, close. Against a sockfsm Server (Echo) and the plain server,
// in the same run. The client's costs (connect, close) are included, and the
// same in both.
func BenchmarkChurnTCP(b *testing.B) {
	b.Run("sockfsm", func(b *testing.B) {
		srv := newEchoServer(0)
		benchChurn(b, srv.Serve, srv.Shutdown, ErrServerClosed)
	})
	b.Run("plain", func(b *testing.B) {
		srv := &plain.Server{}
		benchChurn(b, srv.Serve, srv.Shutdown, plain.ErrServerClosed)
	})
}

func benchChurn(b *testing.B, serve func(net.Listener) error, shutdown func(context.Context) error, closed error) {
	ln := startBenchServer(b, serve, shutdown, closed)
	addr := ln.Addr().String()
	b.ReportAllocs()
	buf := make([]byte, len(benchChunk)+1)
	for b.Loop() {
		nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		c := nc.(*net.TCPConn)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(benchChunk); err != nil {
			b.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil {
			b.Fatal(err)
		}
		n, err := io.ReadFull(c, buf)
		if err != io.ErrUnexpectedEOF || string(buf[:n]) != string(benchChunk) {
			b.Fatalf("read %q, %v; want the echo, then EOF", buf[:n], err)
		}
		c.Close()
	}
}

// idleConns is how many idle connections BenchmarkIdleMemory holds.
const idleConns = 500

// BenchmarkIdleMemory measures the memory of idle connections in the Go
// runtime's own accounting, which RSS (bench/compare.sh, loadgen -mode idle)
// cannot break down: each op opens idleConns connections to the server in
// this process, echoes one byte on each (so that each is accepted and parked
// in a read), and reports the growth of the heap and of goroutine stacks per
// connection; then it closes them gracefully. The client's sockets are in
// the same process, so both metrics include the client's share, which is the
// same for both servers.
func BenchmarkIdleMemory(b *testing.B) {
	b.Run("sockfsm", func(b *testing.B) {
		srv := newEchoServer(0)
		benchIdleMemory(b, srv.Serve, srv.Shutdown, srv.NumConns, ErrServerClosed)
	})
	b.Run("plain", func(b *testing.B) {
		srv := &plain.Server{}
		benchIdleMemory(b, srv.Serve, srv.Shutdown, srv.NumConns, plain.ErrServerClosed)
	})
}

func benchIdleMemory(b *testing.B, serve func(net.Listener) error, shutdown func(context.Context) error, numConns func() int, closed error) {
	m := startIdleMeter(b, serve, shutdown, numConns, closed)
	var heap, stack, ops float64
	for b.Loop() {
		h, s := m.measure(idleConns)
		heap += h
		stack += s
		ops++
	}
	b.ReportMetric(heap/ops, "heap-B/conn")
	b.ReportMetric(stack/ops, "stack-B/conn")
}

// TestIdleConnectionStack keeps an idle connection's goroutine within its
// initial 2 KiB stack, as the plain server's is: the driver's frames under
// the blocked read, and those on the way from a read to the handler's
// Write, once grew it to 4 KiB, about a fifth of an idle connection's memory
// (docs/performance.md).
//
// The measurement runs in a child process (this test binary, re-executed
// with SOCKFSM_STACK_CHILD=1) and on its first connections: the runtime
// sizes new goroutines' stacks by the average stack it last scanned
// (GODEBUG adaptivestackstart), which in a test process the earlier tests
// and the harness's own deep goroutines would set. The race detector
// doubles the stack guard, so the test runs without it.
func TestIdleConnectionStack(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes stack sizes")
	}
	const n = 500 // enough to drown the runtime's own stacks (a new thread's is 16 KiB)
	if os.Getenv(stackEnv) == "1" {
		srv := newEchoServer(0)
		m := startIdleMeter(t, srv.Serve, srv.Shutdown, srv.NumConns, ErrServerClosed)
		heap, stack := m.measure(n)
		fmt.Printf("idle-memory stack=%.0f heap=%.0f\n", stack, heap)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestIdleConnectionStack$", "-test.count=1")
	cmd.Env = append(os.Environ(), stackEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the child failed: %v\n%s", err, out)
	}
	var stack, heap float64
	found := false
	for _, line := range strings.Split(string(out), "\n") {
		if _, err := fmt.Sscanf(line, "idle-memory stack=%g heap=%g", &stack, &heap); err == nil {
			found = true
		}
	}
	if !found {
		t.Fatalf("the child printed no measurement:\n%s", out)
	}
	t.Logf("%d idle connections: %.0f B of stack and %.0f B of heap per connection, client included", n, stack, heap)
	// 2 KiB per goroutine, plus runtime noise; a grown stack is 4 KiB.
	if stack > 3<<10 {
		t.Errorf("idle connections use %.0f B of goroutine stack each; want at most %d (the initial 2 KiB, plus noise)", stack, 3<<10)
	}
}

// stackEnv marks TestIdleConnectionStack's child process.
const stackEnv = "SOCKFSM_STACK_CHILD"

// newEchoServer returns a Server of Echo with a logger that writes nowhere
// and the given ReadBufferSize (0: the default).
func newEchoServer(readBufferSize int) *Server {
	return &Server{
		Config:     Config{ReadBufferSize: readBufferSize, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))},
		NewHandler: func(ConnInfo) Handler { return Echo{} },
	}
}

// idleMeter measures the memory of idle connections to a server running in
// this process.
type idleMeter struct {
	tb       testing.TB
	addr     string
	numConns func() int
}

// startIdleMeter serves on a loopback listener until tb's cleanup, which
// shuts the server down gracefully.
func startIdleMeter(tb testing.TB, serve func(net.Listener) error, shutdown func(context.Context) error, numConns func() int, closed error) *idleMeter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- serve(ln) }()
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := shutdown(ctx); err != nil {
			tb.Errorf("shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, closed) {
			tb.Errorf("serve: %v", err)
		}
	})
	return &idleMeter{tb: tb, addr: ln.Addr().String(), numConns: numConns}
}

// waitConns waits, bounded, until the server has n connections open.
func (m *idleMeter) waitConns(n int) {
	for deadline := time.Now().Add(10 * time.Second); m.numConns() != n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			m.tb.Fatalf("%d connections open, want %d", m.numConns(), n)
		}
	}
}

// measure opens n connections, echoes one byte on each (so that each is
// accepted and parked in a read), and returns the growth of the heap and of
// goroutine stacks per connection; then it closes them gracefully.
func (m *idleMeter) measure(n int) (heap, stack float64) {
	var before, after runtime.MemStats
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range n {
		c, err := net.DialTimeout("tcp", m.addr, 10*time.Second)
		if err != nil {
			m.tb.Fatal(err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var p [1]byte
		if _, err := c.Write([]byte{'x'}); err != nil {
			m.tb.Fatal(err)
		}
		if _, err := io.ReadFull(c, p[:]); err != nil {
			m.tb.Fatal(err)
		}
	}
	m.waitConns(n)
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap = (float64(after.HeapInuse) - float64(before.HeapInuse)) / float64(n)
	stack = (float64(after.StackInuse) - float64(before.StackInuse)) / float64(n)
	for _, c := range conns {
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
	}
	conns = conns[:0]
	m.waitConns(0)
	return heap, stack
}
