// Command soak drives a running echo server (cmd/server) with a mix of
// well-behaved and misbehaving clients, and checks what the well-behaved
// ones see: every echo byte-exact, every close graceful (EOF, never a
// reset).
//
// Usage:
//
//	soak [-addr host:port] [-n N] [-duration d] [-c N] [-mix kind=weight,...] [-pid PID] [flags]
//
// It runs lifecycles, -c at a time, until -n have run or -duration has
// passed (whichever comes first; at least one must be set), or until
// SIGINT. Each lifecycle is one connection of one of these kinds, drawn by
// weight from -mix:
//
//	good      the tutorial's client: send, half-close, read the echo to EOF (byte-checked)
//	idle      connects and never sends: the server's idle timeout closes it (EOF)
//	nofin     sends, reads its echo, then never sends its FIN: the server's idle
//	          timeout sends ours, and the client holds the socket for -hold before
//	          checking it saw no reset and closing
//	slowread  sends a large message and never reads the echo: the server's write
//	          timeout aborts it (a reset, expected)
//	reset     sends, reads part of the echo, then aborts (SO_LINGER 0) mid-stream
//	trickle   sends one byte every -trickle-interval, reading the echo, until the
//	          server closes (MaxLifetime, or the idle timeout); then it stops and
//	          closes. After -trickle-max bytes it half-closes itself.
//
// good, idle, nofin and trickle are graceful paths: a reset seen by one of
// them is a bug. So is an echo that differs from what was sent, by any
// kind.
//
// The server's timeouts decide how long the misbehaving kinds last: start
// cmd/server with short ones for a soak, for example
//
//	server -addr 127.0.0.1:27015 -idle-timeout 1s -write-timeout 1s \
//	    -linger-timeout 1s -linger-time 3s -max-lifetime 5s
//
// and give -timeout (the bound on one lifecycle) a value above them.
//
// Only loopback addresses may be targeted: -addr must name or resolve to
// loopback addresses only.
//
// With -pid, the server process is sampled every -sample: its open file
// descriptors (/proc/PID/fd), threads and resident memory (/proc/PID/status;
// goroutines are not visible from outside the process), and their peaks
// are reported. Linux only; elsewhere the peaks are -1.
//
// The summary gives the lifecycles by kind and outcome. Its last line, on
// stdout, is machine-readable:
//
//	soak lifecycles=N graceful=N resets_on_graceful=N peak_fds=N peak_rss_kib=N peak_threads=N failures=N seconds=S
//
// The exit status is 0 if no lifecycle failed, 1 if one did (a reset on a
// graceful path, a wrong echo, a timeout, an unexpected error), and 2 for
// a bad command line.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/bench/internal/probe"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// The kinds of lifecycle.
const (
	kindGood     = "good"
	kindIdle     = "idle"
	kindNoFIN    = "nofin"
	kindSlowRead = "slowread"
	kindReset    = "reset"
	kindTrickle  = "trickle"
)

var kinds = []string{kindGood, kindIdle, kindNoFIN, kindSlowRead, kindReset, kindTrickle}

// graceful reports whether a kind's lifecycle must end without a reset.
func graceful(kind string) bool {
	return kind == kindGood || kind == kindIdle || kind == kindNoFIN || kind == kindTrickle
}

// Outcomes of a lifecycle.
const (
	outOK          = "ok"           // as the kind expects, gracefully (slowread, reset: their expected abort)
	outShort       = "short-echo"   // EOF before the whole echo: the server closed first (MaxLifetime, say); graceful
	outReset       = "reset"        // a reset, where the kind expects none
	outMismatch    = "mismatch"     // echo bytes that differ from what was sent, or extra bytes
	outTimeout     = "timeout"      // -timeout passed
	outNoAbort     = "no-abort"     // slowread: everything was sent and nothing aborted it
	outError       = "error"        // any other error, dial errors included
	outServerReset = "server-reset" // slowread's expected outcome
	outClientReset = "client-reset" // reset's expected outcome
)

// failed reports whether an outcome fails the run.
func failed(outcome string) bool {
	switch outcome {
	case outOK, outShort, outServerReset, outClientReset:
		return false
	}
	return true
}

// options are the parsed flags.
type options struct {
	addr       string
	n          int
	duration   time.Duration
	conc       int
	mix        map[string]int
	pid        int
	timeout    time.Duration
	seed       uint64
	maxMsg     int
	hold       time.Duration
	trickleInt time.Duration
	trickleMax int
	slowMax    int
	sample     time.Duration
	verbose    bool
}

// maxDuration bounds -duration, so that a run always ends.
const maxDuration = 24 * time.Hour

func parse(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: soak [flags]\n\nDrives a running echo server on a loopback address with well-behaved and misbehaving clients.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.addr, "addr", "localhost:27015", "the server's `host:port` (loopback only)")
	fs.IntVar(&o.n, "n", 1000, "run this many lifecycles (0: no count bound)")
	fs.DurationVar(&o.duration, "duration", 0, "run for this long (0: no time bound; at most 24h)")
	fs.IntVar(&o.conc, "c", 16, "lifecycles at a time")
	mix := fs.String("mix", "good=60,idle=5,nofin=5,slowread=5,reset=15,trickle=10", "`kind=weight,...` of "+strings.Join(kinds, ", "))
	fs.IntVar(&o.pid, "pid", 0, "the server's process id, to sample its descriptors, threads and memory (Linux)")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "bound on one lifecycle; make it longer than the server's timeouts")
	seed := fs.Uint64("seed", 0, "random seed (0: from the clock)")
	fs.IntVar(&o.maxMsg, "max-msg", 64<<10, "largest message of good, nofin and reset lifecycles")
	fs.DurationVar(&o.hold, "hold", time.Second, "nofin: how long to hold the socket after the server's FIN")
	fs.DurationVar(&o.trickleInt, "trickle-interval", 50*time.Millisecond, "trickle: the time between two bytes")
	fs.IntVar(&o.trickleMax, "trickle-max", 200, "trickle: half-close after this many bytes")
	fs.IntVar(&o.slowMax, "slow-max", 64<<20, "slowread: give up after sending this many bytes")
	fs.DurationVar(&o.sample, "sample", 100*time.Millisecond, "with -pid, the sampling period")
	fs.BoolVar(&o.verbose, "v", false, "print every failed lifecycle")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	fail := func(format string, a ...any) (options, error) {
		fmt.Fprintf(stderr, "soak: "+format+"\n", a...)
		return o, flag.ErrHelp
	}
	switch {
	case fs.NArg() > 0:
		return fail("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	case o.n < 0 || o.duration < 0:
		return fail("-n and -duration cannot be negative")
	case o.n == 0 && o.duration == 0:
		return fail("set -n or -duration: the run must be bounded")
	case o.duration > maxDuration:
		return fail("-duration is at most %v", maxDuration)
	case o.conc < 1:
		return fail("-c must be at least 1")
	case o.timeout <= 0 || o.hold < 0 || o.trickleInt <= 0 || o.sample <= 0:
		return fail("-timeout, -trickle-interval and -sample must be positive, -hold not negative")
	case o.maxMsg < 2 || o.trickleMax < 1 || o.slowMax < 1:
		return fail("-max-msg must be at least 2, -trickle-max and -slow-max at least 1")
	case o.pid < 0:
		return fail("bad -pid %d", o.pid)
	}
	var err error
	if o.mix, err = parseMix(*mix); err != nil {
		return fail("bad -mix: %v", err)
	}
	o.seed = *seed
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	return o, nil
}

func parseMix(s string) (map[string]int, error) {
	mix := map[string]int{}
	total := 0
	for _, part := range strings.Split(s, ",") {
		kind, w, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("%q is not kind=weight", part)
		}
		known := false
		for _, k := range kinds {
			known = known || k == kind
		}
		if !known {
			return nil, fmt.Errorf("unknown kind %q (kinds: %s)", kind, strings.Join(kinds, ", "))
		}
		n, err := strconv.Atoi(w)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad weight %q for %s", w, kind)
		}
		mix[kind] += n
		total += n
	}
	if total == 0 {
		return nil, errors.New("every weight is zero")
	}
	return mix, nil
}

// run is the whole program; it returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parse(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) && len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
			return 0
		}
		return 2
	}
	addr, err := probe.ResolveLoopback(ctx, o.addr)
	if err != nil {
		fmt.Fprintf(stderr, "soak: -addr %s: %v\n", o.addr, err)
		return 2
	}

	var mon *monitor
	if o.pid > 0 {
		mon = startMonitor(o.pid, o.sample)
	}
	start := time.Now()
	st := soak(ctx, addr, o)
	elapsed := time.Since(start)
	var peak peaks
	if mon != nil {
		peak = mon.stop()
	} else {
		peak = peaks{fds: -1, threads: -1, rssKiB: -1}
	}
	st.report(stdout, o, elapsed, peak)
	if st.failures > 0 {
		return 1
	}
	return 0
}

// stats is what the lifecycles came to.
type stats struct {
	mu                  sync.Mutex
	byKind              map[string]map[string]int
	lifecycles          int
	gracefulN, resetsOn int
	failures            int
	samples             []string
}

func (s *stats) add(kind, outcome, detail string, verbose bool, stderr io.Writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byKind[kind] == nil {
		s.byKind[kind] = map[string]int{}
	}
	s.byKind[kind][outcome]++
	s.lifecycles++
	if graceful(kind) {
		s.gracefulN++
		if outcome == outReset {
			s.resetsOn++
		}
	}
	if failed(outcome) {
		s.failures++
		line := fmt.Sprintf("%s: %s: %s", kind, outcome, detail)
		if verbose {
			fmt.Fprintln(stderr, "soak:", line)
		}
		if len(s.samples) < 10 {
			s.samples = append(s.samples, line)
		}
	}
}

func (s *stats) report(w io.Writer, o options, elapsed time.Duration, p peaks) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(w, "soak: %d lifecycles in %v against %s, %d at a time (seed %d)\n", s.lifecycles, elapsed.Round(time.Millisecond), o.addr, o.conc, o.seed)
	for _, k := range kinds {
		outs := s.byKind[k]
		if len(outs) == 0 {
			continue
		}
		names := make([]string, 0, len(outs))
		for name := range outs {
			names = append(names, name)
		}
		sort.Strings(names)
		var b strings.Builder
		for _, name := range names {
			fmt.Fprintf(&b, " %s=%d", name, outs[name])
		}
		fmt.Fprintf(w, "  %-9s%s\n", k, b.String())
	}
	if len(s.samples) > 0 {
		fmt.Fprintf(w, "failed lifecycles (first %d):\n", len(s.samples))
		for _, l := range s.samples {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
	if p.fds >= 0 {
		fmt.Fprintf(w, "server pid %d: peak %d descriptors, %d threads, %d KiB resident\n", o.pid, p.fds, p.threads, p.rssKiB)
	}
	fmt.Fprintf(w, "soak lifecycles=%d graceful=%d resets_on_graceful=%d peak_fds=%d peak_rss_kib=%d peak_threads=%d failures=%d seconds=%.1f\n",
		s.lifecycles, s.gracefulN, s.resetsOn, p.fds, p.rssKiB, p.threads, s.failures, elapsed.Seconds())
}

// soak runs the lifecycles.
func soak(ctx context.Context, addr string, o options) *stats {
	st := &stats{byKind: map[string]map[string]int{}}
	var stop <-chan time.Time
	if o.duration > 0 {
		t := time.NewTimer(o.duration)
		defer t.Stop()
		stop = t.C
	}
	// The kinds in a weighted list, drawn from by the producer.
	var pick []string
	for _, k := range kinds {
		for range o.mix[k] {
			pick = append(pick, k)
		}
	}
	rng := rand.New(rand.NewPCG(o.seed, o.seed>>1|1))
	type job struct {
		kind string
		seed uint64
	}
	jobs := make(chan job)
	go func() {
		defer close(jobs)
		for i := 0; o.n == 0 || i < o.n; i++ {
			j := job{pick[rng.IntN(len(pick))], rng.Uint64()}
			select {
			case jobs <- j:
			case <-stop:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range o.conc {
		wg.Go(func() {
			for j := range jobs {
				c := &client{addr: addr, o: o, rng: rand.New(rand.NewPCG(j.seed, 1))}
				outcome, detail := c.lifecycle(j.kind)
				st.add(j.kind, outcome, detail, o.verbose, os.Stderr)
			}
		})
	}
	wg.Wait()
	return st
}

// client runs one lifecycle.
type client struct {
	addr string
	o    options
	rng  *rand.Rand
}

func (cl *client) lifecycle(kind string) (string, string) {
	c, err := net.DialTimeout("tcp", cl.addr, cl.o.timeout)
	if err != nil {
		return outError, fmt.Sprintf("dial: %v", err)
	}
	tc := c.(*net.TCPConn)
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(cl.o.timeout))
	switch kind {
	case kindGood:
		return cl.good(tc)
	case kindIdle:
		return cl.idle(tc)
	case kindNoFIN:
		return cl.noFIN(tc)
	case kindSlowRead:
		return cl.slowRead(tc)
	case kindReset:
		return cl.reset(tc)
	case kindTrickle:
		return cl.trickle(tc)
	}
	return outError, "unknown kind " + kind
}

// message returns a message of 1 to max bytes (at least min) that differs
// from one offset to the next.
func (cl *client) message(min int) []byte {
	n := max(min, 1+cl.rng.IntN(cl.o.maxMsg))
	b := make([]byte, n)
	k := byte(cl.rng.Uint32())
	for i := range b {
		b[i] = k + byte(i*7+i/251)
	}
	return b
}

// classify names the outcome of an error.
func classify(err error) string {
	switch {
	case probe.IsReset(err):
		return outReset
	case probe.IsTimeout(err):
		return outTimeout
	}
	return outError
}

// readEcho reads from c and compares with want from offset 0, until an
// error or, if stopAt is true, len(want) bytes. It returns the bytes that
// matched and the error (nil for EOF, or for reaching len(want) with
// stopAt). A byte that differs, or one past want, is reported as
// errMismatch.
func readEcho(c net.Conn, want []byte, stopAt bool) (int, error) {
	buf := make([]byte, 32<<10)
	off := 0
	for {
		if stopAt && off == len(want) {
			return off, nil
		}
		limit := len(buf)
		if stopAt {
			limit = min(limit, len(want)-off)
		}
		n, err := c.Read(buf[:limit])
		if n > 0 {
			if off+n > len(want) {
				return off, fmt.Errorf("%w: %d bytes past the %d sent", errMismatch, off+n-len(want), len(want))
			}
			for i := range n {
				if buf[i] != want[off+i] {
					return off + i, fmt.Errorf("%w at byte %d", errMismatch, off+i)
				}
			}
			off += n
		}
		if errors.Is(err, io.EOF) {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
}

var errMismatch = errors.New("echo differs from what was sent")

// writeAsync writes p (and half-closes, if closeWrite) on its own
// goroutine, so that the echo can be read meanwhile; the channel gets the
// error.
func writeAsync(c *net.TCPConn, p []byte, closeWrite bool) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(p)
		if err == nil && closeWrite {
			err = c.CloseWrite()
		}
		done <- err
	}()
	return done
}

// endWrite waits for a writeAsync to end, closing c first if the read
// ended in error (a blocked write then returns). A reset is reported once,
// to whichever of a write and a read meets it first, and a read after that
// returns EOF: so a write that met a reset makes the lifecycle a reset,
// whatever the read saw.
func endWrite(c *net.TCPConn, written <-chan error, readErr error) error {
	if readErr != nil {
		c.Close()
	}
	werr := <-written
	if probe.IsReset(werr) {
		return werr
	}
	return nil
}

// good is the tutorial's client.
func (cl *client) good(c *net.TCPConn) (string, string) {
	msg := cl.message(1)
	written := writeAsync(c, msg, true)
	n, err := readEcho(c, msg, false)
	if werr := endWrite(c, written, err); werr != nil {
		return outReset, fmt.Sprintf("write: %v (read %d of %d bytes, then %v)", werr, n, len(msg), err)
	}
	switch {
	case errors.Is(err, errMismatch):
		return outMismatch, err.Error()
	case err != nil:
		return classify(err), fmt.Sprintf("after %d of %d bytes: %v", n, len(msg), err)
	case n < len(msg):
		return outShort, fmt.Sprintf("EOF after %d of %d bytes", n, len(msg))
	}
	return outOK, ""
}

// idle never sends; the server's idle timeout must close it gracefully.
func (cl *client) idle(c *net.TCPConn) (string, string) {
	n, err := readEcho(c, nil, false)
	switch {
	case errors.Is(err, errMismatch):
		return outMismatch, fmt.Sprintf("the server sent %d bytes unasked", n)
	case err != nil:
		return classify(err), err.Error()
	}
	return outOK, ""
}

// noFIN sends, reads the echo, and then never sends its FIN: it waits for
// the server's, holds the socket, and checks that no reset came.
func (cl *client) noFIN(c *net.TCPConn) (string, string) {
	msg := cl.message(1)
	written := writeAsync(c, msg, false)
	n, err := readEcho(c, msg, true)
	if werr := endWrite(c, written, err); werr != nil {
		return outReset, fmt.Sprintf("write: %v", werr)
	}
	if err == nil && n < len(msg) {
		return outShort, fmt.Sprintf("EOF after %d of %d bytes", n, len(msg))
	}
	if err == nil {
		// The server's FIN, after its idle timeout.
		_, err = readEcho(c, nil, false)
	}
	if err == nil {
		time.Sleep(cl.o.hold)
		_, err = readEcho(c, nil, false) // still EOF, not a reset
	}
	switch {
	case errors.Is(err, errMismatch):
		return outMismatch, err.Error()
	case err != nil:
		return classify(err), err.Error()
	}
	return outOK, ""
}

// slowRead sends until the server aborts it, never reading.
func (cl *client) slowRead(c *net.TCPConn) (string, string) {
	chunk := make([]byte, 64<<10)
	sent := 0
	for sent < cl.o.slowMax {
		n, err := c.Write(chunk[:min(len(chunk), cl.o.slowMax-sent)])
		sent += n
		if err != nil {
			if probe.IsReset(err) {
				return outServerReset, ""
			}
			return classify(err), fmt.Sprintf("after sending %d bytes: %v", sent, err)
		}
	}
	return outNoAbort, fmt.Sprintf("sent %d bytes and was not aborted", sent)
}

// reset sends, reads part of the echo, and aborts.
func (cl *client) reset(c *net.TCPConn) (string, string) {
	msg := cl.message(2)
	written := writeAsync(c, msg, false)
	part := msg[:1+cl.rng.IntN(len(msg)-1)]
	n, err := readEcho(c, part, true)
	if err == nil && n < len(part) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		if werr := endWrite(c, written, err); werr != nil {
			return outReset, fmt.Sprintf("write: %v", werr)
		}
		if errors.Is(err, errMismatch) {
			return outMismatch, err.Error()
		}
		return classify(err), fmt.Sprintf("after %d of %d bytes: %v", n, len(part), err)
	}
	// Abort mid-stream: the rest of the echo is unread, and the write may
	// still be going on.
	c.SetLinger(0)
	c.Close()
	<-written
	return outClientReset, ""
}

// trickle sends a byte at a time until the server closes.
func (cl *client) trickle(c *net.TCPConn) (string, string) {
	var (
		mu   sync.Mutex
		sent []byte
	)
	stop := make(chan struct{})
	written := make(chan error, 1)
	go func() {
		tick := time.NewTicker(cl.o.trickleInt)
		defer tick.Stop()
		for i := range cl.o.trickleMax {
			select {
			case <-stop:
				written <- nil
				return
			case <-tick.C:
			}
			b := byte('a' + i%26)
			mu.Lock()
			sent = append(sent, b)
			mu.Unlock()
			if _, err := c.Write([]byte{b}); err != nil {
				written <- err
				return
			}
		}
		written <- c.CloseWrite()
	}()
	// Read until EOF, checking each byte against what was sent by then.
	buf := make([]byte, 512)
	got := 0
	var err error
	for err == nil {
		var n int
		n, err = c.Read(buf)
		mu.Lock()
		ok := got+n <= len(sent) && string(buf[:n]) == string(sent[got:got+n])
		mu.Unlock()
		if !ok {
			close(stop)
			<-written
			return outMismatch, fmt.Sprintf("echo at byte %d differs from what was sent", got)
		}
		got += n
	}
	close(stop)
	if werr := endWrite(c, written, nil); werr != nil {
		return outReset, fmt.Sprintf("write: %v", werr)
	}
	if !errors.Is(err, io.EOF) {
		return classify(err), fmt.Sprintf("after %d bytes of echo: %v", got, err)
	}
	return outOK, ""
}

// ---- sampling the server process --------------------------------------------

// peaks are the largest values sampled; -1 when not sampled.
type peaks struct{ fds, threads, rssKiB int }

type monitor struct {
	done chan struct{}
	res  chan peaks
}

// startMonitor samples process pid every period until stop.
func startMonitor(pid int, period time.Duration) *monitor {
	m := &monitor{done: make(chan struct{}), res: make(chan peaks, 1)}
	go func() {
		p := peaks{fds: -1, threads: -1, rssKiB: -1}
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			sample(pid, &p)
			select {
			case <-m.done:
				sample(pid, &p)
				m.res <- p
				return
			case <-t.C:
			}
		}
	}()
	return m
}

func (m *monitor) stop() peaks {
	close(m.done)
	return <-m.res
}

// sample raises p to what /proc says of process pid now. VmHWM, the
// kernel's own peak of the resident set, counts as well as the sampled
// VmRSS.
func sample(pid int, p *peaks) {
	if n, err := probe.FDs(pid); err == nil {
		p.fds = max(p.fds, n)
	}
	if s, err := probe.ReadStatus(pid); err == nil {
		p.threads = max(p.threads, int(s.Threads))
		p.rssKiB = max(p.rssKiB, int(s.RSSKiB), int(s.HWMKiB))
	}
}
