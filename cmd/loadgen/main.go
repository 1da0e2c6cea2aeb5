// Command loadgen loads an echo server over loopback TCP and measures it: the
// client side of bench/compare.sh, for cmd/server (sockfsm) and
// bench/plainecho (the plain baseline).
//
// Usage:
//
//	loadgen [-mode echo|churn|idle] [-addr 127.0.0.1:27015] [-conns N]
//	        [-size S] [-duration D] [-n OPS] [-timeout T] [-pid PID]
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
//     the rate.
//   - idle: opens -conns connections (default 1000), 128 at a time; each
//     does one 1-byte echo (so that the server has certainly accepted it and
//     parked it in a read), then stays idle for -duration, or until the
//     server has closed every one (after a SIGTERM, say). A connection the
//     server closes gracefully counts in eofs. With -pid, the server's RSS
//     (VmRSS in /proc/PID/status) is read before the first connect and
//     again while every connection is open and idle; the difference divided
//     by the connections is kib_per_conn. An op is one connection
//     established and echoed; its latency runs from the connect to the echo.
//     Then each connection closes gracefully.
//
// The run lasts -duration (default 10s, at most 10m) or -n ops (echo,
// churn), whichever comes first; SIGINT ends it early. Every socket
// operation has a deadline (-timeout, default 5s). -addr must be a loopback
// address (127.0.0.0/8, ::1) or localhost: anything else is refused. The soft
// limit on open files is raised as far as the hard limit if -conns needs it.
//
// Output: logs and a human summary on stderr, then one line on stdout:
//
//	loadgen mode=echo addr=127.0.0.1:27015 conns=32 size=64 elapsed_s=10.001 ops=412345 errors=0 resets=0 mismatches=0 eofs=0 p50_us=71.2 p90_us=95.0 p99_us=160.4 max_us=2107.9 ops_per_s=41230.4 rss_before_kib=-1 rss_after_kib=-1 kib_per_conn=-1
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
//	eofs            idle: connections the server closed gracefully during the hold; 0 otherwise
//	p50_us, p90_us, p99_us, max_us   the ops' latency percentiles, µs (±0.4%)
//	ops_per_s       ops / elapsed_s
//	rss_before_kib, rss_after_kib    idle with -pid: the server's VmRSS, KiB; -1 otherwise
//	kib_per_conn    (rss_after_kib - rss_before_kib) / ops, KiB; -1 without them
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
	fs.IntVar(&o.pid, "pid", 0, "idle: the server's pid, to report its RSS per connection (Linux)")
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
	}
	if err := checkLoopback(o.addr); err != nil {
		return bad("%v", err)
	}
	return o, nil
}

// checkLoopback returns an error unless addr's host is "localhost" or a
// loopback IP address. It resolves nothing.
func checkLoopback(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("-addr %q: %v", addr, err)
	}
	if port == "" || port == "0" {
		return fmt.Errorf("-addr %q: no port", addr)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("-addr %q: not a loopback address: loadgen only loads 127.0.0.0/8, ::1 or localhost", addr)
}

// result is what a run measured.
type result struct {
	elapsed                         time.Duration
	ops, errors, resets, mismatches int64
	eofs                            int64
	lat                             *hist
	rssBefore, rssAfter             int64 // KiB; -1: not measured
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

	var r *result
	switch o.mode {
	case "echo":
		r = runEcho(ctx, o, log)
	case "churn":
		r = runChurn(ctx, o, log)
	case "idle":
		r = runIdle(ctx, o, log)
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
		"p50_us=%s p90_us=%s p99_us=%s max_us=%s ops_per_s=%.1f rss_before_kib=%d rss_after_kib=%d kib_per_conn=%s",
		o.mode, o.addr, o.conns, o.size, secs, r.ops, r.errors, r.resets, r.mismatches, r.eofs,
		us(r.lat.quantile(0.50)), us(r.lat.quantile(0.90)), us(r.lat.quantile(0.99)), us(r.lat.max),
		rate, r.rssBefore, r.rssAfter, perConn)
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
		fmt.Fprintf(w, ", closed by the server during the hold %d", r.eofs)
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
	if r.rssNote != "" {
		fmt.Fprintf(w, "  note       %s\n", r.rssNote)
	}
}
