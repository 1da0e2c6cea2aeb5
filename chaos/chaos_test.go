package chaos_test

// TestChaos runs thousands of echo lifecycles through toxiproxy, one proxy
// per fault, all in front of one sockfsm Server (one listener per proxy, so
// that the server's reports can be told apart by the listener's address).
//
// Toxiproxy relays the two directions of a connection independently and does
// not relay a half-close: when the client's FIN reaches it, it closes its
// connection to the server outright. So the clients here do not use the
// tutorial's "send, half-close, read to EOF" (the proxy would cut the echo
// off); they send, read the whole echo, then half-close and read EOF. The
// server still sees the tutorial's order of events: input, output, the
// peer's FIN.
//
// No test asserts how long anything took. Every client socket has a deadline
// (deadline) so that a hang fails a lifecycle instead of the run, and the
// run is bounded in count (lifecycles per fault) and in time (budget).

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
)

// TestMain fails the run if a goroutine outlives the tests, but for
// toxiproxyLeak's.
func TestMain(m *testing.M) {
	zerolog.SetGlobalLevel(zerolog.Disabled) // toxiproxy's toxics log through zerolog's global logger
	goleak.VerifyTestMain(m, toxiproxyLeak)
}

// toxiproxyLeak ignores the goroutines of one known toxiproxy (v2.5.0)
// leak: when a timeout or reset_peer toxic has stopped reading its input (it
// has timed out, or reset the link), the next chunk the link reads (an echo
// the server sent late) is taken by the hidden noop toxic in front of it,
// which then blocks forever handing it on. Those goroutines are toxiproxy's
// alone: no sockfsm goroutine runs toxiproxy code.
var toxiproxyLeak = goleak.IgnoreTopFunction("github.com/Shopify/toxiproxy/v2/toxics.(*NoopToxic).Pipe")

// deadline bounds each client lifecycle and every wait.
const deadline = 10 * time.Second

// The run's size: perFault lifecycles through each proxy, concurrency at a
// time, with messages of 1 to maxMsg bytes, all bounded by budget
// (lifecycles not started by then are not run). For a longer run:
//
//	go test -race ./... -args -lifecycles=5000 -budget=10m
var (
	perFault    = flag.Int("lifecycles", 300, "lifecycles through each proxy")
	budget      = flag.Duration("budget", 90*time.Second, "bound on the whole run")
	concurrency = flag.Int("concurrency", 6, "clients at a time through each proxy")
	maxMsg      = flag.Int("max-msg", 8<<10, "largest message")
)

// fault is one proxy's toxics and what its clients may see.
type fault struct {
	name   string
	toxics []string // toxiproxy's JSON for each toxic
	// disruptive faults may reset, cut short or stall an exchange; the
	// others must let every exchange complete, with no reset.
	disruptive bool
}

var faults = []fault{
	{name: "none"},
	{name: "latency", toxics: []string{
		`{"name":"lat_down","type":"latency","stream":"downstream","attributes":{"latency":10,"jitter":5}}`,
		`{"name":"lat_up","type":"latency","stream":"upstream","attributes":{"latency":10,"jitter":5}}`,
	}},
	{name: "bandwidth", toxics: []string{
		`{"name":"bw_down","type":"bandwidth","stream":"downstream","attributes":{"rate":256}}`,
		`{"name":"bw_up","type":"bandwidth","stream":"upstream","attributes":{"rate":256}}`,
	}},
	{name: "slicer", toxics: []string{
		`{"name":"sl_down","type":"slicer","stream":"downstream","attributes":{"average_size":64,"size_variation":48,"delay":200}}`,
		`{"name":"sl_up","type":"slicer","stream":"upstream","attributes":{"average_size":64,"size_variation":48,"delay":200}}`,
	}},
	{name: "slow_close", toxics: []string{
		`{"name":"sc_down","type":"slow_close","stream":"downstream","attributes":{"delay":50}}`,
		`{"name":"sc_up","type":"slow_close","stream":"upstream","attributes":{"delay":50}}`,
	}},
	{name: "reset_peer", disruptive: true, toxics: []string{
		// On the first chunk in either direction, reset both sides,
		// for about half of the links.
		`{"name":"rp_down","type":"reset_peer","stream":"downstream","toxicity":0.5,"attributes":{"timeout":5}}`,
		`{"name":"rp_up","type":"reset_peer","stream":"upstream","toxicity":0.3,"attributes":{"timeout":0}}`,
	}},
	{name: "timeout", disruptive: true, toxics: []string{
		// Swallow the echo and close after 100 ms, for about half of
		// the links.
		`{"name":"to_down","type":"timeout","stream":"downstream","toxicity":0.5,"attributes":{"timeout":100}}`,
	}},
}

// Outcomes of a lifecycle, as the client sees it.
const (
	outOK       = "ok"               // the whole echo, then EOF
	outReset    = "reset"            // ECONNRESET or EPIPE before the whole echo arrived
	outResetEnd = "reset-after-echo" // the whole echo, exact, then a reset instead of EOF
	outShort    = "short"            // EOF before the whole echo, which was exact so far
	outTimeout  = "timeout"          // the client's deadline passed
	outMismatch = "mismatch"         // the echo differed from what was sent: never allowed
	outExtra    = "extra"            // bytes after the echo: never allowed
	outOther    = "other-error"      // any other error
)

// lifecycle runs one client through addr: send msg, read the whole echo,
// half-close, read EOF, close. It returns the outcome and, for the bad
// ones, a description.
func lifecycle(addr string, msg []byte) (string, string) {
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		return classify(err), fmt.Sprintf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		written <- err
	}()
	got := make([]byte, len(msg))
	n, err := io.ReadFull(c, got)
	if !bytes.Equal(got[:n], msg[:n]) {
		c.Close()
		<-written
		return outMismatch, fmt.Sprintf("echo differs from what was sent within the first %d bytes", n)
	}
	if err != nil {
		c.Close()
		// A reset is reported once, to whichever of the write and the
		// read meets it first; a read after that returns EOF.
		if werr := <-written; classify(werr) == outReset {
			return outReset, fmt.Sprintf("write: %v; the read got %v after %d of %d bytes", werr, err, n, len(msg))
		}
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return outShort, fmt.Sprintf("EOF after %d of %d bytes", n, len(msg))
		}
		return classify(err), fmt.Sprintf("after %d of %d bytes: %v", n, len(msg), err)
	}
	if err := <-written; err != nil {
		return classify(err), fmt.Sprintf("write: %v", err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		if classify(err) == outReset {
			return outResetEnd, fmt.Sprintf("CloseWrite: %v", err)
		}
		return classify(err), fmt.Sprintf("CloseWrite: %v", err)
	}
	rest, err := io.ReadAll(c)
	switch {
	case len(rest) > 0:
		return outExtra, fmt.Sprintf("%d bytes after the echo", len(rest))
	case err != nil && classify(err) == outReset:
		return outResetEnd, fmt.Sprintf("waiting for EOF: %v", err)
	case err != nil:
		return classify(err), fmt.Sprintf("waiting for EOF: %v", err)
	}
	return outOK, ""
}

func classify(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return outReset
	case errors.Is(err, os.ErrDeadlineExceeded):
		return outTimeout
	}
	return outOther
}

// serverReports counts the server's CloseInfo reasons per listener address.
type serverReports struct {
	mu      sync.Mutex
	reasons map[string]map[sockfsm.Reason]int
}

func (r *serverReports) add(local string, info sockfsm.CloseInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.reasons[local] == nil {
		r.reasons[local] = map[sockfsm.Reason]int{}
	}
	r.reasons[local][info.Reason]++
}

// reporter is Echo that reports how each connection ended.
type reporter struct{ r *serverReports }

func (reporter) OnData(c *sockfsm.Conn, p []byte) { c.Write(p) }
func (h reporter) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	h.r.add(c.Info().LocalAddr.String(), info)
}

// logWriter passes the server's warnings and errors to t.Log while the
// test runs.
type logWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func TestChaos(t *testing.T) {
	reports := &serverReports{reasons: map[string]map[sockfsm.Reason]int{}}
	lw := &logWriter{t: t}
	defer func() {
		lw.mu.Lock()
		lw.done = true
		lw.mu.Unlock()
	}()
	srv := &sockfsm.Server{
		Config: sockfsm.Config{
			IdleTimeout: 3 * time.Second, WriteTimeout: 3 * time.Second,
			LingerTimeout: time.Second, LingerTime: 2 * time.Second,
			Logger: slog.New(slog.NewTextHandler(lw, &slog.HandlerOptions{Level: slog.LevelWarn})),
		},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler { return reporter{reports} },
	}
	api := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())

	type target struct {
		fault
		proxy    *toxiproxy.Proxy
		upstream string // the server's listener behind the proxy
	}
	var (
		targets []*target
		served  = make(chan error, len(faults))
	)
	for _, f := range faults {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() { served <- srv.Serve(ln) }()
		p := toxiproxy.NewProxy(api, f.name, "127.0.0.1:0", ln.Addr().String())
		if err := p.Start(); err != nil {
			t.Fatalf("starting the %s proxy: %v", f.name, err)
		}
		for _, js := range f.toxics {
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
				t.Fatalf("adding toxic %s: %v", js, err)
			}
		}
		targets = append(targets, &target{fault: f, proxy: p, upstream: ln.Addr().String()})
	}

	// The lifecycles: every proxy at once, concurrency clients each.
	type tally struct {
		mu       sync.Mutex
		outcomes map[string]int
		samples  []string // descriptions of the first few bad outcomes
	}
	tallies := make([]*tally, len(targets))
	stopAt := time.Now().Add(*budget)
	var wg sync.WaitGroup
	for i, tg := range targets {
		tl := &tally{outcomes: map[string]int{}}
		tallies[i] = tl
		next := make(chan int)
		go func() {
			defer close(next)
			for n := range *perFault {
				if time.Now().After(stopAt) {
					return
				}
				next <- n
			}
		}()
		for w := range *concurrency {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(i), uint64(w)))
				for n := range next {
					msg := make([]byte, 1+rng.IntN(*maxMsg))
					for j := range msg {
						msg[j] = byte(n + j*7)
					}
					out, why := lifecycle(tg.proxy.Listen, msg)
					tl.mu.Lock()
					tl.outcomes[out]++
					if out != outOK && len(tl.samples) < 5 {
						tl.samples = append(tl.samples, fmt.Sprintf("%s: %s", out, why))
					}
					tl.mu.Unlock()
				}
			})
		}
	}
	wg.Wait()

	// Stop the proxies (closing whatever they still hold), then the server.
	for _, tg := range targets {
		tg.proxy.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want nil or the deadline", err)
	}
	for range targets {
		select {
		case err := <-served:
			if !errors.Is(err, sockfsm.ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		case <-time.After(deadline):
			t.Fatal("Serve did not return after Shutdown")
		}
	}
	if n := srv.NumConns(); n != 0 {
		t.Errorf("NumConns after Shutdown = %d, want 0", n)
	}

	// Judge.
	total := 0
	for i, tg := range targets {
		tl := tallies[i]
		n := 0
		for _, c := range tl.outcomes {
			n += c
		}
		total += n
		reports.mu.Lock()
		server := reports.reasons[tg.upstream]
		reports.mu.Unlock()
		t.Logf("%-10s %4d lifecycles: client %s; server %s", tg.name, n, fmtCounts(tl.outcomes), fmtReasons(server))
		if n == 0 {
			t.Errorf("%s: no lifecycle ran", tg.name)
		}
		for _, bad := range []string{outMismatch, outExtra} {
			if tl.outcomes[bad] > 0 {
				t.Errorf("%s: %d lifecycles ended %s: %q", tg.name, tl.outcomes[bad], bad, tl.samples)
			}
		}
		if !tg.disruptive {
			if tl.outcomes[outOK] != n {
				t.Errorf("%s: %d of %d lifecycles did not complete (resets: %d): %q", tg.name, n-tl.outcomes[outOK], n, tl.outcomes[outReset], tl.samples)
			}
			for r, c := range server {
				if r.Abortive() {
					t.Errorf("%s: the server aborted %d connections (%v)", tg.name, c, r)
				}
			}
		}
	}
	t.Logf("%d lifecycles in all", total)
	if want := *perFault * len(targets); total < want && time.Now().Before(stopAt) {
		t.Errorf("only %d of %d lifecycles ran", total, want)
	}

	// Every connection, Serve loop and toxiproxy link is gone (but for
	// toxiproxy's own known leak).
	goleak.VerifyNone(t, toxiproxyLeak)
}

func fmtCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%d ", k, m[k])
	}
	return strings.TrimSpace(b.String())
}

func fmtReasons(m map[sockfsm.Reason]int) string {
	s := map[string]int{}
	for r, c := range m {
		s[r.String()] = c
	}
	return fmtCounts(s)
}
