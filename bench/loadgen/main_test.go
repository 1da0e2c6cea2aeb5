package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/bench/plain"
	"github.com/sockfsm/sockfsm/internal/testutil"
)

// testDeadline bounds every wait in these tests. It is a bound, not a timing
// assertion.
const testDeadline = 10 * time.Second

// keys is the machine line's keys, in order, as the package doc lists them.
var keys = []string{"mode", "addr", "conns", "size", "elapsed_s", "ops", "errors", "resets", "mismatches", "eofs",
	"p50_us", "p90_us", "p99_us", "max_us", "ops_per_s", "rss_before_kib", "rss_after_kib", "kib_per_conn",
	"server_cpu_ms", "shutdown_ms"}

// runLoadgen runs the program and returns its exit code and the machine
// line's values.
func runLoadgen(t *testing.T, args ...string) (int, map[string]string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*testDeadline)
	defer cancel()
	code := run(ctx, args, &stdout, &stderr)
	t.Logf("loadgen %s: exit %d\n%s%s", strings.Join(args, " "), code, stderr.String(), stdout.String())
	if code == 2 {
		return code, nil
	}
	line := strings.TrimSpace(stdout.String())
	f := strings.Fields(line)
	if len(f) != len(keys)+1 || f[0] != "loadgen" {
		t.Fatalf("machine line %q: want loadgen and %d key=value pairs", line, len(keys))
	}
	kv := map[string]string{}
	for i, p := range f[1:] {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k != keys[i] {
			t.Fatalf("machine line %q: field %d is %q, want key %s", line, i+1, p, keys[i])
		}
		kv[k] = v
	}
	return code, kv
}

func num(t *testing.T, kv map[string]string, k string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(kv[k], 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", k, kv[k], err)
	}
	return v
}

// startServer serves on 127.0.0.1:0 with serve and shuts the server down
// in t.Cleanup.
func startServer(t *testing.T, serve func(net.Listener) error, shutdown func(context.Context) error) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		serve(ln)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		shutdown(ctx)
		<-done
	})
	return ln.Addr().String()
}

func plainServer(t *testing.T) (*plain.Server, string) {
	s := &plain.Server{}
	return s, startServer(t, s.Serve, s.Shutdown)
}

func sockfsmServer(t *testing.T) string {
	s := &sockfsm.Server{
		Config:     sockfsm.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} },
	}
	return startServer(t, s.Serve, s.Shutdown)
}

func TestParse(t *testing.T) {
	o, err := parse([]string{"-mode", "idle"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.conns != 1000 || o.size != 1 || o.duration != 10*time.Second || o.addr != "127.0.0.1:27015" {
		t.Errorf("idle defaults: %+v", o)
	}
	o, err = parse([]string{"-mode", "churn"}, io.Discard)
	if err != nil || o.conns != 32 || o.size != 14 {
		t.Errorf("churn defaults: %+v, %v", o, err)
	}
	o, err = parse(nil, io.Discard)
	if err != nil || o.mode != "echo" || o.conns != 32 || o.size != 64 {
		t.Errorf("echo defaults: %+v, %v", o, err)
	}
	for _, addr := range []string{"127.0.0.1:1", "127.3.2.1:80", "[::1]:27015", "localhost:27015"} {
		if _, err := parse([]string{"-addr", addr}, io.Discard); err != nil {
			t.Errorf("-addr %s: %v", addr, err)
		}
	}
	for _, args := range [][]string{
		{"-addr", "10.0.0.1:80"},
		{"-addr", "example.com:80"},
		{"-addr", "[2001:db8::1]:80"},
		{"-addr", "0.0.0.0:80"},
		{"-addr", "127.0.0.1"},
		{"-addr", "127.0.0.1:0"},
		{"-mode", "flood"},
		{"-duration", "11m"},
		{"-duration", "0s"},
		{"-conns", "-1"},
		{"-conns", "60001"},
		{"-size", "2000000"},
		{"-n", "-5"},
		{"-timeout", "0s"},
		{"-shutdown"},
		{"-mode", "idle", "-shutdown"},
		{"-mode", "echo", "-shutdown", "-pid", "1"},
		{"-sources", "10.0.0.1"},
		{"-sources", "127.0.0.5-127.0.0.2"},
		{"-sources", "127.0.0.1-127.1.0.0"},
		{"-sources", "::1-127.0.0.2"},
		{"-sources", "127.0.0.2,"},
		{"extra"},
	} {
		if _, err := parse(args, io.Discard); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}

// TestRefusesNonLoopback: a non-loopback -addr is refused before any
// connection is tried.
func TestRefusesNonLoopback(t *testing.T) {
	if code, _ := runLoadgen(t, "-addr", "192.0.2.1:7"); code != 2 {
		t.Fatalf("exit %d, want 2", code)
	}
}

func TestHist(t *testing.T) {
	var h hist
	if h.quantile(0.5) != 0 {
		t.Fatal("empty histogram")
	}
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, 1000 * time.Microsecond}} {
		got := h.quantile(c.q)
		if d := float64(got-c.want) / float64(c.want); d < -0.005 || d > 0.005 {
			t.Errorf("q%v = %v, want %v ± 0.5%%", c.q, got, c.want)
		}
	}
	for _, v := range []uint64{0, 1, 127, 128, 129, 255, 256, 1000, 1 << 20, 123456789, 1 << 36} {
		i := bucketOf(v)
		if m := bucketMid(i); float64(m) < float64(v)*0.99 || float64(m) > float64(v)*1.01+1 {
			t.Errorf("value %d: bucket %d, middle %d", v, i, m)
		}
	}
	if bucketOf(1<<62) != numBuckets-1 {
		t.Error("huge values do not clamp")
	}
}

func TestEcho(t *testing.T) {
	for name, addr := range map[string]func(*testing.T) string{
		"plain":   func(t *testing.T) string { _, a := plainServer(t); return a },
		"sockfsm": sockfsmServer,
	} {
		t.Run(name, func(t *testing.T) {
			code, kv := runLoadgen(t, "-mode", "echo", "-addr", addr(t), "-conns", "4", "-size", "100", "-n", "200", "-duration", "1m")
			if code != 0 || kv["ops"] != "200" || kv["errors"] != "0" || kv["resets"] != "0" || kv["mismatches"] != "0" {
				t.Fatalf("exit %d, %v", code, kv)
			}
			if num(t, kv, "p50_us") <= 0 || num(t, kv, "p99_us") < num(t, kv, "p50_us") || kv["kib_per_conn"] != "-1" {
				t.Errorf("latencies or memory: %v", kv)
			}
		})
	}
}

func TestChurn(t *testing.T) {
	for name, addr := range map[string]func(*testing.T) string{
		"plain":   func(t *testing.T) string { _, a := plainServer(t); return a },
		"sockfsm": sockfsmServer,
	} {
		t.Run(name, func(t *testing.T) {
			code, kv := runLoadgen(t, "-mode", "churn", "-addr", addr(t), "-conns", "4", "-n", "100", "-duration", "1m")
			if code != 0 || kv["ops"] != "100" || kv["size"] != "14" || kv["errors"] != "0" || kv["resets"] != "0" || kv["mismatches"] != "0" {
				t.Fatalf("exit %d, %v", code, kv)
			}
		})
	}
}

func TestIdle(t *testing.T) {
	_, addr := plainServer(t)
	args := []string{"-mode", "idle", "-addr", addr, "-conns", "20", "-duration", "100ms"}
	if runtime.GOOS == "linux" {
		args = append(args, "-pid", strconv.Itoa(os.Getpid())) // the server runs in this process
	}
	code, kv := runLoadgen(t, args...)
	if code != 0 || kv["ops"] != "20" || kv["eofs"] != "0" || kv["errors"] != "0" {
		t.Fatalf("exit %d, %v", code, kv)
	}
	if runtime.GOOS == "linux" && (num(t, kv, "rss_before_kib") <= 0 || num(t, kv, "rss_after_kib") <= 0) {
		t.Errorf("no RSS: %v", kv)
	}
}

// TestIdleServerShutdown: the server shuts down during the hold; every
// connection is closed gracefully (eofs), and the hold ends early.
func TestIdleServerShutdown(t *testing.T) {
	s, addr := plainServer(t)
	type res struct {
		code int
		kv   map[string]string
	}
	done := make(chan res, 1)
	var stderr testutil.SyncBuffer
	go func() {
		var stdout bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 2*testDeadline)
		defer cancel()
		code := run(ctx, []string{"-mode", "idle", "-addr", addr, "-conns", "10", "-duration", "1m"}, &stdout, &stderr)
		kv := map[string]string{}
		for _, p := range strings.Fields(stdout.String()) {
			if k, v, ok := strings.Cut(p, "="); ok {
				kv[k] = v
			}
		}
		done <- res{code, kv}
	}()
	// Every connection has had its ping echoed (loadgen says it holds
	// them) before the server shuts down: a connection the server accepted
	// but had not answered yet would count as a failed op.
	for deadline := time.Now().Add(testDeadline); !strings.Contains(stderr.String(), "holding idle connections"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("loadgen did not start holding its connections: %d open on the server", s.NumConns())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case r := <-done:
		if r.code != 0 || r.kv["eofs"] != "10" || r.kv["ops"] != "10" {
			t.Fatalf("exit %d, %v", r.code, r.kv)
		}
	case <-time.After(testDeadline):
		t.Fatal("loadgen did not end after the server closed every connection")
	}
}

// badServer runs handle on each connection until the listener closes.
func badServer(t *testing.T, handle func(*net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(testDeadline))
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

func TestCountsMismatches(t *testing.T) {
	addr := badServer(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		c.Write(bytes.ToUpper(b))
	})
	code, kv := runLoadgen(t, "-mode", "churn", "-addr", addr, "-conns", "2", "-n", "10", "-duration", "1m")
	if code != 1 || kv["mismatches"] != "10" || kv["ops"] != "0" {
		t.Fatalf("exit %d, %v", code, kv)
	}
}

func TestCountsResets(t *testing.T) {
	addr := badServer(t, func(c *net.TCPConn) {
		var b [1]byte
		io.ReadFull(c, b[:])
		c.SetLinger(0) // close with unread input and SO_LINGER 0: RST
	})
	code, kv := runLoadgen(t, "-mode", "churn", "-addr", addr, "-conns", "2", "-n", "10", "-duration", "1m")
	// Usually the RST fails the read; if it arrives before our half-close,
	// that fails instead, with another error.
	if code != 1 || kv["ops"] != "0" || num(t, kv, "resets") < 1 || num(t, kv, "resets")+num(t, kv, "errors") != 10 {
		t.Fatalf("exit %d, %v", code, kv)
	}
}

func TestNoServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	code, kv := runLoadgen(t, "-mode", "echo", "-addr", addr, "-conns", "2", "-duration", "1s")
	if code != 1 || kv["ops"] != "0" || kv["errors"] != "2" {
		t.Fatalf("exit %d, %v", code, kv)
	}
}

// TestChurnSource: churn's workers spread over loopback source addresses
// for an IPv4 loopback server, and use the default for ::1 and names.
func TestChurnSource(t *testing.T) {
	seen := map[string]bool{}
	for w := range churnSources {
		src := churnSource("127.0.0.1:27015", w)
		if src == nil || !src.IP.IsLoopback() || src.IP.To4() == nil || src.Port != 0 {
			t.Fatalf("worker %d: source %v, want an IPv4 loopback address with any port", w, src)
		}
		seen[src.IP.String()] = true
	}
	if len(seen) != churnSources {
		t.Errorf("%d workers use %d source addresses, want %d", churnSources, len(seen), churnSources)
	}
	if src := churnSource("127.0.0.1:27015", churnSources); !src.IP.Equal(churnSource("127.0.0.1:27015", 0).IP) {
		t.Errorf("worker %d's source %v: want worker 0's again", churnSources, src)
	}
	for _, addr := range []string{"[::1]:27015", "localhost:27015", "bad"} {
		if src := churnSource(addr, 1); src != nil {
			t.Errorf("churnSource(%q) = %v, want nil (the default source)", addr, src)
		}
	}
}

func TestParseSources(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.2":                          "127.0.0.2",
		"127.0.0.2-127.0.0.5":                "127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5",
		"127.0.0.254-127.0.1.1":              "127.0.0.254 127.0.0.255 127.0.1.0 127.0.1.1",
		"::1, 127.0.0.9-127.0.0.9,127.1.2.3": "::1 127.0.0.9 127.1.2.3",
	} {
		ips, err := parseSources(in)
		if err != nil {
			t.Errorf("parseSources(%q): %v", in, err)
			continue
		}
		var got []string
		for _, ip := range ips {
			got = append(got, ip.String())
		}
		if strings.Join(got, " ") != want {
			t.Errorf("parseSources(%q) = %v, want %s", in, got, want)
		}
	}
	if _, err := parseSources("127.0.0.1-127.0.1.1"); err == nil {
		t.Errorf("a range of %d addresses: accepted", 257)
	}
}

// sourceServer is an echo server that records its peers' addresses.
func sourceServer(t *testing.T) (string, func() map[string]int) {
	var mu sync.Mutex
	peers := map[string]int{}
	addr := badServer(t, func(c *net.TCPConn) {
		mu.Lock()
		peers[c.RemoteAddr().(*net.TCPAddr).IP.String()]++
		mu.Unlock()
		io.Copy(struct{ io.Writer }{c}, c)
		c.CloseWrite()
	})
	return addr, func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(peers)
	}
}

// TestSources: with -sources, every mode's connections come from those
// addresses, in turn.
func TestSources(t *testing.T) {
	for _, mode := range []string{"echo", "churn", "idle"} {
		t.Run(mode, func(t *testing.T) {
			addr, peers := sourceServer(t)
			code, kv := runLoadgen(t, "-mode", mode, "-addr", addr, "-conns", "6", "-n", "60", "-duration", "200ms",
				"-sources", "127.0.0.2-127.0.0.3,127.0.0.7")
			if code != 0 || kv["errors"] != "0" || kv["resets"] != "0" {
				t.Fatalf("exit %d, %v", code, kv)
			}
			got := peers()
			if len(got) != 3 || got["127.0.0.2"] == 0 || got["127.0.0.3"] == 0 || got["127.0.0.7"] == 0 {
				t.Errorf("the server's peers: %v, want 127.0.0.2, 127.0.0.3 and 127.0.0.7", got)
			}
		})
	}
}

// serverEnv, when set, makes the test binary a server for TestIdleShutdown
// (see TestMain): "fin" serves bench/plain and shuts it down gracefully on
// SIGTERM; "rst" resets every connection on SIGTERM.
const serverEnv = "LOADGEN_TEST_SERVER"

// childServer runs when the test binary is started with serverEnv: it
// listens on 127.0.0.1:0, prints the address on stdout, and serves until
// SIGTERM.
func childServer(kind string) int {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(ln.Addr())
	switch kind {
	case "fin":
		s := &plain.Server{}
		go s.Serve(ln)
		<-sigs
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			return 1
		}
	case "rst":
		var mu sync.Mutex
		var conns []*net.TCPConn
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				conns = append(conns, c.(*net.TCPConn))
				mu.Unlock()
				go io.Copy(struct{ io.Writer }{c}, c)
			}
		}()
		<-sigs
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.SetLinger(0)
			c.Close()
		}
		mu.Unlock()
	}
	return 0
}

// TestIdleShutdown: -shutdown sends the server (a child process) SIGTERM
// after the hold and counts how it closes the idle connections: all with a
// FIN for a graceful server, all with a RST for one that resets them.
func TestIdleShutdown(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("-shutdown reads /proc")
	}
	for _, kind := range []string{"fin", "rst"} {
		t.Run(kind, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*testDeadline)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), serverEnv+"="+kind)
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Wait()
			defer cmd.Process.Kill()
			addr, err := bufio.NewReader(out).ReadString('\n')
			if err != nil {
				t.Fatalf("the child server printed no address: %v", err)
			}
			code, kv := runLoadgen(t, "-mode", "idle", "-addr", strings.TrimSpace(addr), "-conns", "40", "-duration", "100ms",
				"-sources", "127.0.0.2-127.0.0.3", "-pid", strconv.Itoa(cmd.Process.Pid), "-shutdown")
			if err := cmd.Wait(); err != nil {
				t.Errorf("the child server: %v", err)
			}
			if kv["ops"] != "40" || num(t, kv, "shutdown_ms") < 0 || kv["mismatches"] != "0" {
				t.Fatalf("exit %d, %v", code, kv)
			}
			switch kind {
			case "fin":
				if code != 0 || kv["eofs"] != "40" || kv["resets"] != "0" || kv["errors"] != "0" {
					t.Errorf("a graceful shutdown: exit %d, %v; want 40 FINs and no reset", code, kv)
				}
			case "rst":
				if code != 1 || kv["resets"] != "40" || kv["eofs"] != "0" {
					t.Errorf("a resetting shutdown: exit %d, %v; want 40 resets, no FIN, exit 1", code, kv)
				}
			}
		})
	}
}
