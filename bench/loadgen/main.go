// Command loadgen loads an echo server over loopback TCP and measures it: the
// client side of bench/compare.sh, for cmd/server (sockfsm) and the servers
// it is compared with (bench/plainecho, bench/minimal, bench/gnetecho).
//
// Usage:
//
//	loadgen [-mode echo|churn|idle] [-addr 127.0.0.1:27015] [-conns N]
//	        [-size S] [-duration D] [-n OPS] [-timeout T] [-pid PID]
//	        [-sources 127.0.0.2-127.0.0.5] [-shutdown]
//
// The modes:
//
//   - echo: -conns persistent connections (default 32), each doing S-byte
//     round trips (-size, default 64) one after the other: write S bytes,
//     read S bytes back. Every byte is checked; each round trip carries a
//     different pattern. An op is one round trip, and its latency runs from
//     the write to the last byte read. At the end each connection closes
//     gracefully: our FIN, read to EOF, close.
//   - churn: -conns workers (default 32), each opening connections one
//     after the other: connect, send S bytes (-size, default 14, the
//     tutorial's "this is a test"), half-close, read to EOF, check, close.
//     An op is one whole connection; its latency runs from the connect to
//     the EOF. To a server on 127.0.0.0/8, each worker connects from a
//     source address of its own (127.0.0.2, 127.0.0.3, ...; see
//     churnSources), so that the client's ports in TIME_WAIT do not limit
//     the rate. -sources replaces these addresses with its own.
//   - idle: opens -conns connections (default 1000), 128 at a time; each
//     does one 1-byte echo (so that the server has certainly accepted it and
//     parked it in a read), then stays idle for -duration, or until the
//     server has closed every one (after a SIGTERM, say). A connection the
//     server closes gracefully counts in eofs. With -pid, the server's RSS
//     (VmRSS in /proc/PID/status) is read before the first connect and
//     again while every connection is open and idle; the difference divided
//     by the connections is kib_per_conn. An op is one connection
//     established and echoed; its latency runs from the connect to the echo.
//     Then each connection closes gracefully. With -shutdown (and -pid),
//     once the hold is over loadgen sends the server SIGTERM instead, and
//     waits for the server to close every connection: each one it closes
//     with a FIN counts in eofs, each one it resets in resets (a failure:
//     a graceful shutdown resets none), and shutdown_ms is the time from
//     the signal to the last connection's end.
//
// -sources binds the connections to loopback source addresses, in turn:
// one source address has about 28,000 ephemeral ports (the kernel's
// ip_local_port_range), so many connections to one server need several. It
// takes a comma-separated list of addresses and IPv4 ranges
// (127.0.0.2-127.0.0.5), all loopback.
//
// The run lasts -duration (default 10s, at most 10m) or -n ops (echo,
// churn), whichever comes first; SIGINT ends it early. Every socket
// operation has a deadline (-timeout, default 5s). -addr must be a loopback
// address (127.0.0.0/8, ::1) or localhost: anything else is refused. The soft
// limit on open files is raised as far as the hard limit if -conns needs it.
// With -pid, the server's CPU time (utime+stime in /proc/PID/stat) is read
// before the first connect and after the last close: server_cpu_ms.
//
// Output: logs and a human summary on stderr, then one line on stdout:
//
//	loadgen mode=echo addr=127.0.0.1:27015 conns=32 size=64 elapsed_s=10.001 ops=412345 errors=0 resets=0 mismatches=0 eofs=0 p50_us=71.2 p90_us=95.0 p99_us=160.4 max_us=2107.9 ops_per_s=41230.4 rss_before_kib=-1 rss_after_kib=-1 kib_per_conn=-1 server_cpu_ms=-1 shutdown_ms=-1
//
// Every key is always present, in this order:
//
//	mode            echo, churn or idle
//	addr            the server's address
//	conns           connections (echo, idle) or workers (churn)
//	size            bytes per round trip (echo) or per connection (churn); 1 for idle
//	elapsed_s       seconds the load ran (idle: the hold)
//	ops             ops completed and checked (see the modes)
//	errors          failed ops other than resets and mismatches (timeouts, refused, ...)
//	resets          ops failed by ECONNRESET (the server's RST), the graceful closes included
//	mismatches      ops whose echo differed from what was sent
//	eofs            idle: connections the server closed gracefully (its FIN) before ours; 0 otherwise
//	p50_us, p90_us, p99_us, max_us   the ops' latency percentiles, µs (±0.4%)
//	ops_per_s       ops / elapsed_s
//	rss_before_kib, rss_after_kib    idle with -pid: the server's VmRSS, KiB; -1 otherwise
//	kib_per_conn    (rss_after_kib - rss_before_kib) / ops, KiB; -1 without them
//	server_cpu_ms   with -pid: the server's CPU time during the run, ms (to 10 ms); -1 otherwise
//	shutdown_ms     idle with -shutdown: from SIGTERM to the last connection's end, ms; -1 otherwise
//
// The exit status is 0 when the run completed with no errors, resets or
// mismatches, 1 when it completed with some (the line is printed anyway) or
// could not run, and 2 for bad flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/sockfsm/sockfsm/bench/internal/probe"
)

// Bounds on the flags.
const (
	// MaxDuration is the hard cap on -duration.
	MaxDuration = 10 * time.Minute
	// MaxConns is the hard cap on -conns: about the loopback's ephemeral
	// ports.
	MaxConns = 60000
	// MaxSize is the largest -size.
	MaxSize = 1 << 20
	// MaxTimeout is the largest -timeout.
	MaxTimeout = time.Minute
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// options are the parsed flags.
type options struct {
	mode     string
	addr     string
	conns    int
	size     int
	duration time.Duration
	n        int64
	timeout  time.Duration
	pid      int
	sources  []net.IP // nil: the default (see churnSource)
	shutdown bool
}

func parse(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.mode, "mode", "echo", "echo, churn or idle")
	fs.StringVar(&o.addr, "addr", "127.0.0.1:27015", "the server's loopback `host:port`")
	fs.IntVar(&o.conns, "conns", 0, "connections (echo, idle) or workers (churn); 0: 32, or 1000 for idle")
	fs.IntVar(&o.size, "size", 0, "bytes per round trip (echo) or connection (churn); 0: 64 for echo, 14 for churn")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long to run (idle: to hold), at most "+MaxDuration.String())
	fs.Int64Var(&o.n, "n", 0, "stop after this many ops (echo, churn); 0: no limit")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Second, "deadline of every socket operation")
	fs.IntVar(&o.pid, "pid", 0, "the server's pid, to report its CPU time and (idle) its RSS per connection (Linux)")
	sources := fs.String("sources", "", "loopback source `addresses` to connect from, in turn: a comma-separated list of addresses and IPv4 ranges (127.0.0.2-127.0.0.5)")
	fs.BoolVar(&o.shutdown, "shutdown", false, "idle, with -pid: after the hold, send the server SIGTERM and time its closing every connection")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	bad := func(format string, a ...any) (options, error) {
		return o, fmt.Errorf(format, a...)
	}
	switch o.mode {
	case "echo", "churn", "idle":
	default:
		return bad("-mode %q: want echo, churn or idle", o.mode)
	}
	if o.conns == 0 {
		o.conns = 32
		if o.mode == "idle" {
			o.conns = 1000
		}
	}
	if o.size == 0 {
		o.size = 64
		if o.mode == "churn" {
			o.size = 14
		}
	}
	if o.mode == "idle" {
		o.size = 1
	}
	switch {
	case fs.NArg() > 0:
		return bad("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	case o.conns < 1 || o.conns > MaxConns:
		return bad("-conns %d: want 1 to %d", o.conns, MaxConns)
	case o.size < 1 || o.size > MaxSize:
		return bad("-size %d: want 1 to %d", o.size, MaxSize)
	case o.duration <= 0 || o.duration > MaxDuration:
		return bad("-duration %v: want more than 0 and at most %v", o.duration, MaxDuration)
	case o.n < 0:
		return bad("-n %d is negative", o.n)
	case o.timeout <= 0 || o.timeout > MaxTimeout:
		return bad("-timeout %v: want more than 0 and at most %v", o.timeout, MaxTimeout)
	case o.pid < 0:
		return bad("-pid %d is negative", o.pid)
	case o.shutdown && (o.mode != "idle" || o.pid == 0):
		return bad("-shutdown goes with -mode idle and -pid")
	}
	if err := checkLoopback(o.addr); err != nil {
		return bad("%v", err)
	}
	if *sources != "" {
		var err error
		if o.sources, err = parseSources(*sources); err != nil {
			return bad("-sources %q: %v", *sources, err)
		}
	}
	return o, nil
}

// maxSources bounds -sources.
const maxSources = 256

// parseSources parses -sources: a comma-separated list of loopback
// addresses and IPv4 ranges first-last.
func parseSources(s string) ([]net.IP, error) {
	var ips []net.IP
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		first, last, isRange := strings.Cut(part, "-")
		a := net.ParseIP(first)
		if a == nil || !a.IsLoopback() {
			return nil, fmt.Errorf("%q is not a loopback address", first)
		}
		if !isRange {
			ips = append(ips, a)
			continue
		}
		b := net.ParseIP(last)
		a4, b4 := a.To4(), b.To4()
		if a4 == nil || b4 == nil || !b.IsLoopback() {
			return nil, fmt.Errorf("range %q: want two IPv4 loopback addresses", part)
		}
		lo, hi := uint32(a4[1])<<16|uint32(a4[2])<<8|uint32(a4[3]), uint32(b4[1])<<16|uint32(b4[2])<<8|uint32(b4[3])
		if hi < lo {
			return nil, fmt.Errorf("range %q is empty", part)
		}
		if hi-lo >= maxSources {
			return nil, fmt.Errorf("range %q: more than %d addresses", part, maxSources)
		}
		for v := lo; v <= hi; v++ {
			ips = append(ips, net.IPv4(127, byte(v>>16), byte(v>>8), byte(v)))
		}
	}
	if len(ips) > maxSources {
		return nil, fmt.Errorf("more than %d addresses", maxSources)
	}
	return ips, nil
}

// checkLoopback returns an error unless addr has a port and its host is
// "localhost" or a loopback IP address. It resolves nothing.
func checkLoopback(addr string) error {
	if err := probe.CheckLoopback(addr); err != nil {
		return fmt.Errorf("-addr: %w: loadgen only loads this machine", err)
	}
	if _, port, _ := net.SplitHostPort(addr); port == "" || port == "0" {
		return fmt.Errorf("-addr %q: no port", addr)
	}
	return nil
}

// result is what a run measured.
type result struct {
	elapsed                         time.Duration
	ops, errors, resets, mismatches int64
	eofs                            int64
	lat                             *hist
	rssBefore, rssAfter             int64         // KiB; -1: not measured
	serverCPU                       time.Duration // -1: not measured
	shutdown                        time.Duration // -1: not measured
	rssNote                         string
	firstErr                        error
	dialFailed                      bool // nothing could be measured: no connection was made
}

// run is the whole program; it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "loadgen: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if err := raiseFileLimit(uint64(o.conns) + 64); err != nil {
		fmt.Fprintf(stderr, "loadgen: %v\n", err)
		return 1
	}
	// A backstop only: the connects (at most dialConcurrency at a time, each
	// bounded by -timeout), the run, the closes, and some slack.
	backstop := o.duration + 2*o.timeout + time.Duration(o.conns/dialConcurrency+1)*o.timeout + 10*time.Second
	ctx, cancel := context.WithTimeout(ctx, backstop)
	defer cancel()

	cpu0 := time.Duration(-1)
	if o.pid > 0 {
		if d, err := probe.CPUTime(o.pid); err == nil {
			cpu0 = d
		} else {
			log.Warn("cannot read the server's CPU time", "err", err)
		}
	}
	var r *result
	switch o.mode {
	case "echo":
		r = runEcho(ctx, o, log)
	case "churn":
		r = runChurn(ctx, o, log)
	case "idle":
		r = runIdle(ctx, o, log)
	}
	r.serverCPU = -1
	if cpu0 >= 0 {
		// After -shutdown the server may have exited: no second reading.
		if d, err := probe.CPUTime(o.pid); err == nil {
			r.serverCPU = d - cpu0
		}
	}
	summarize(stderr, o, r)
	fmt.Fprintln(stdout, machineLine(o, r))
	switch {
	case r.dialFailed:
		return 1
	case r.errors > 0 || r.resets > 0 || r.mismatches > 0:
		return 1
	}
	return 0
}

func us(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Microsecond)) }

// ms formats d in milliseconds, or -1 for a negative d (not measured).
func ms(d time.Duration) string {
	if d < 0 {
		return "-1"
	}
	return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond))
}

// machineLine formats the final line; see the package doc for the keys.
func machineLine(o options, r *result) string {
	secs := r.elapsed.Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(r.ops) / secs
	}
	perConn := "-1"
	if r.rssBefore >= 0 && r.rssAfter >= 0 && r.ops > 0 {
		perConn = fmt.Sprintf("%.3f", float64(r.rssAfter-r.rssBefore)/float64(r.ops))
	}
	return fmt.Sprintf("loadgen mode=%s addr=%s conns=%d size=%d elapsed_s=%.3f ops=%d errors=%d resets=%d mismatches=%d eofs=%d "+
		"p50_us=%s p90_us=%s p99_us=%s max_us=%s ops_per_s=%.1f rss_before_kib=%d rss_after_kib=%d kib_per_conn=%s server_cpu_ms=%s shutdown_ms=%s",
		o.mode, o.addr, o.conns, o.size, secs, r.ops, r.errors, r.resets, r.mismatches, r.eofs,
		us(r.lat.quantile(0.50)), us(r.lat.quantile(0.90)), us(r.lat.quantile(0.99)), us(r.lat.max),
		rate, r.rssBefore, r.rssAfter, perConn, ms(r.serverCPU), ms(r.shutdown))
}

// summarize writes the human summary.
func summarize(w io.Writer, o options, r *result) {
	secs := r.elapsed.Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(r.ops) / secs
	}
	what := map[string]string{
		"echo":  fmt.Sprintf("%d connections, %d-byte round trips", o.conns, o.size),
		"churn": fmt.Sprintf("%d workers, connect/send %d bytes/half-close/read to EOF/close", o.conns, o.size),
		"idle":  fmt.Sprintf("%d idle connections", o.conns),
	}[o.mode]
	fmt.Fprintf(w, "\nloadgen %s against %s: %s, %.2fs\n", o.mode, o.addr, what, secs)
	fmt.Fprintf(w, "  ops        %d (%.1f/s)\n", r.ops, rate)
	fmt.Fprintf(w, "  errors     %d, resets %d, mismatches %d", r.errors, r.resets, r.mismatches)
	if o.mode == "idle" {
		fmt.Fprintf(w, ", closed by the server first (its FIN) %d", r.eofs)
	}
	fmt.Fprintln(w)
	if r.firstErr != nil {
		fmt.Fprintf(w, "  first error %v\n", r.firstErr)
	}
	if r.lat.n > 0 {
		fmt.Fprintf(w, "  latency    p50 %sµs  p90 %sµs  p99 %sµs  max %sµs\n",
			us(r.lat.quantile(0.5)), us(r.lat.quantile(0.9)), us(r.lat.quantile(0.99)), us(r.lat.max))
	}
	if r.rssBefore >= 0 {
		fmt.Fprintf(w, "  server RSS %d KiB before, %d KiB with the connections open", r.rssBefore, r.rssAfter)
		if r.rssAfter >= 0 && r.ops > 0 {
			fmt.Fprintf(w, ": %.2f KiB per connection", float64(r.rssAfter-r.rssBefore)/float64(r.ops))
		}
		fmt.Fprintln(w)
	}
	if r.serverCPU >= 0 {
		fmt.Fprintf(w, "  server CPU %v during the run\n", r.serverCPU)
	}
	if r.shutdown >= 0 {
		fmt.Fprintf(w, "  shutdown   %v from SIGTERM to the last connection's end: %d FIN, %d RST\n", r.shutdown.Round(time.Millisecond), r.eofs, r.resets)
	}
	if r.rssNote != "" {
		fmt.Fprintf(w, "  note       %s\n", r.rssNote)
	}
}
