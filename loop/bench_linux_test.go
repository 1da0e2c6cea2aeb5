package loop

// Memory and speed. TestConnFootprint checks the per-connection memory by
// construction (allocations and sizes); the benchmarks measure it on real
// sockets:
//
//	go test -run '^$' -bench IdleConn -benchtime=1x ./loop   # one measurement
//	SOCKFSM_IDLE_CONNS=9000 go test -run '^$' -bench IdleConn -benchtime=1x ./loop
//	go test -run '^$' -bench 'Echo|Churn' ./loop

import (
	"context"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

var sinkConn *conn

// TestConnFootprint: a connection costs two allocations, its conn (the
// Engine inside) and its waker's closure, and nothing else: its ConnInfo's
// addresses live in the conn or are the listener's.
func TestConnFootprint(t *testing.T) {
	w := newWorld()
	_, l, a := fakeServer(t, w, sockfsm.Config{})
	sa := &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 2}, Port: 4242}
	mk := func() {
		c, _, err := l.makeConn(7, sa, a, l)
		if err != nil {
			t.Fatal(err)
		}
		sinkConn = c
	}
	allocs := testing.AllocsPerRun(100, mk)
	const n = 1000
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for range n {
		mk()
	}
	runtime.ReadMemStats(&m1)
	perConn := (m1.TotalAlloc - m0.TotalAlloc) / n
	t.Logf("conn: %d bytes (Engine %d); per connection %v allocations, %d bytes allocated", unsafe.Sizeof(conn{}), unsafe.Sizeof(sockfsm.Engine{}), allocs, perConn)
	if allocs > 2 {
		t.Errorf("%v allocations per connection, want 2 (the conn and its waker)", allocs)
	}
	// The budget of an idle connection is 1 KiB, the loop's share of it
	// (the timer entry, the descriptor's slot) included.
	if perConn > 1024-64 {
		t.Errorf("%d bytes allocated per connection: over the budget", perConn)
	}
	if got := sinkConn.e.Info().RemoteAddr.String(); got != "127.0.0.2:4242" {
		t.Errorf("RemoteAddr = %s", got)
	}
	if sinkConn.e.Info().LocalAddr != a.laddr {
		t.Error("LocalAddr is not the listener's shared one")
	}
}

// rawDial connects to addr with a bare socket, so that the client side
// holds no Go heap and the benchmark measures the server's.
func rawDial(b *testing.B, addr *net.TCPAddr) int {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], addr.IP.To4())
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		b.Fatal(err)
	}
	return fd
}

// rss returns the process's resident set, in bytes.
func rss(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		b.Skip("no /proc/self/statm")
	}
	f := strings.Fields(string(data))
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// BenchmarkIdleConn measures what an idle connection costs the server:
// heap (after GC) and RSS, per connection, with SOCKFSM_IDLE_CONNS (default
// 2000) idle connections on one loop. The clients are bare sockets. Run it
// with -benchtime=1x: each run opens the connections once.
func BenchmarkIdleConn(b *testing.B) {
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("SOCKFSM_IDLE_CONNS")); err == nil && v > 0 {
		n = v
	}
	opened := make(chan struct{}, n)
	srv := &Server{
		Config: sockfsm.Config{IdleTimeout: time.Hour},
		NewHandler: conntest.Always(openHandler(func(*sockfsm.Conn) {
			opened <- struct{}{}
		})),
		Loops: 1,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	addr := ln.Addr().(*net.TCPAddr)
	// One connection first, so that the loops, their buffers and the
	// runtime's poller exist before the baseline.
	warm := rawDial(b, addr)
	<-opened

	runtime.GC()
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	rss0 := rss(b)
	fds := make([]int, 0, n)
	b.ResetTimer()
	for range n {
		fds = append(fds, rawDial(b, addr))
	}
	for range n {
		<-opened
	}
	b.StopTimer()
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	rss1 := rss(b)
	b.ReportMetric(float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc))/float64(n), "heap-B/conn")
	b.ReportMetric(float64(rss1-rss0)/float64(n), "rss-B/conn")
	b.ReportMetric(float64(n), "conns")
	b.ReportMetric(0, "ns/op")

	// Every connection closes gracefully: the server's FIN, then ours.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	buf := make([]byte, 1)
	for _, fd := range append(fds, warm) {
		if n, err := unix.Read(fd, buf); n != 0 || err != nil {
			b.Errorf("client read = %d, %v; want the server's FIN", n, err)
		}
		unix.Close(fd)
	}
	if err := <-done; err != nil {
		b.Errorf("Shutdown = %v", err)
	}
	<-served
}

// cpuTime returns the CPU time the process has used, user and system.
func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the process's CPU time per op since start: on a
// shared machine a steadier measure than the wall clock's ns/op.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}

// server is what the benchmarks need of a driver's server.
type server interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
}

// drivers are the servers the benchmarks compare: the loop (one loop) and
// the goroutine driver, both serving Echo with the default Config.
var drivers = []struct {
	name string
	new  func() server
}{
	{"loop", func() server { return &Server{NewHandler: conntest.Always(sockfsm.Echo{}), Loops: 1} }},
	{"goroutine", func() server { return &sockfsm.Server{NewHandler: conntest.Always(sockfsm.Echo{})} }},
}

// serveBench serves srv on 127.0.0.1 until the benchmark ends.
func serveBench(b *testing.B, srv server) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			b.Errorf("Shutdown = %v", err)
		}
		<-served
	})
	return ln.Addr().String()
}

// BenchmarkEcho is one 64-byte echo round trip over one connection, on
// the loop and on the goroutine driver, in the same run. The client's
// costs are included, and the same in both.
func BenchmarkEcho(b *testing.B) {
	for _, d := range drivers {
		b.Run(d.name, func(b *testing.B) {
			c, err := net.Dial("tcp", serveBench(b, d.new()))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			msg := make([]byte, 64)
			buf := make([]byte, 64)
			b.SetBytes(64)
			b.ReportAllocs()
			start := cpuTime()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
			reportCPU(b, start)
		})
	}
}

// BenchmarkChurn is one whole connection per op, the tutorial's: connect,
// send 14 bytes, half-close, read the echo to EOF, close; on the loop and
// on the goroutine driver, in the same run.
func BenchmarkChurn(b *testing.B) {
	msg := []byte("this is a test")
	for _, d := range drivers {
		b.Run(d.name, func(b *testing.B) {
			addr := serveBench(b, d.new())
			buf := make([]byte, len(msg)+1)
			b.ReportAllocs()
			start := cpuTime()
			for b.Loop() {
				nc, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				c := nc.(*net.TCPConn)
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				c.CloseWrite()
				if n, err := io.ReadFull(c, buf); err != io.ErrUnexpectedEOF || n != len(msg) {
					b.Fatalf("read %q, %v; want the echo, then EOF", buf[:n], err)
				}
				c.Close()
			}
			reportCPU(b, start)
		})
	}
}

// BenchmarkSocketCalls is one 64-byte write and the read that takes it,
// over a loopback TCP connection, made with the loop's calls (recv and send
// with MSG_DONTWAIT and MSG_NOSIGNAL: epollKernel.read and write), with
// read(2) and write(2) (unix.Read and unix.Write), which the loop used
// before, and with x/sys's nearest pair (Recvfrom and SendmsgN). Both
// sides run in the benchmark's goroutine, so the figure is the kernel's
// work for the pair: the write delivers the segment to the reading
// socket. Run them interleaved, pinned, for a comparison that the
// machine's drift does not decide:
//
//	go test -c -o /tmp/loop.test ./loop
//	for i in 1 2 3 4 5 6; do for b in recv-send read-write xsys-recvfrom-sendmsg; do
//	  taskset -c 0 /tmp/loop.test -test.run '^$' -test.bench "SocketCalls/$b\$" -test.benchtime 100000x -test.cpu 1
//	done; done
func BenchmarkSocketCalls(b *testing.B) {
	var k epollKernel // read and write use no field
	calls := []struct {
		name        string
		read, write func(fd int32, p []byte) (int, error)
	}{
		{"recv-send", k.read, k.write},
		{"read-write",
			func(fd int32, p []byte) (int, error) { return unix.Read(int(fd), p) },
			func(fd int32, p []byte) (int, error) { return unix.Write(int(fd), p) }},
		{"xsys-recvfrom-sendmsg",
			func(fd int32, p []byte) (int, error) {
				n, _, err := unix.Recvfrom(int(fd), p, unix.MSG_DONTWAIT)
				return n, err
			},
			func(fd int32, p []byte) (int, error) {
				return unix.SendmsgN(int(fd), p, nil, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
			}},
	}
	for _, c := range calls {
		b.Run(c.name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			wfd := rawDial(b, ln.Addr().(*net.TCPAddr))
			defer unix.Close(wfd)
			if err := unix.SetsockoptInt(wfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
				b.Fatal(err) // as the loop's sockets have it
			}
			nc, err := ln.Accept()
			if err != nil {
				b.Fatal(err)
			}
			defer nc.Close()
			f, err := nc.(*net.TCPConn).File() // a blocking duplicate
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			rfd := int32(f.Fd())
			msg, buf := make([]byte, 64), make([]byte, 4096)
			b.SetBytes(64)
			b.ReportAllocs()
			for b.Loop() {
				if n, err := c.write(int32(wfd), msg); n != len(msg) {
					b.Fatalf("write = %d, %v", n, err)
				}
				if n, err := c.read(rfd, buf); n != len(msg) {
					b.Fatalf("read = %d, %v", n, err)
				}
			}
		})
	}
}

// BenchmarkClock is one reading of the loop's clock (epollKernel.now: the
// monotonic clock, and the wall clock once a second) against time.Now,
// which reads both clocks every time, each a vDSO call:
//
//	go test -run '^$' -bench Clock -count 5 ./loop
func BenchmarkClock(b *testing.B) {
	var sink time.Time
	b.Run("loop", func(b *testing.B) {
		var k epollKernel
		for b.Loop() {
			sink = k.now()
		}
	})
	b.Run("time.Now", func(b *testing.B) {
		for b.Loop() {
			sink = time.Now()
		}
	})
	_ = sink
}
