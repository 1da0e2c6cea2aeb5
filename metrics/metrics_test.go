package metrics_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/internal/testutil"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/metrics"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds every socket operation and wait of these tests.
const deadline = 10 * time.Second

// scrape fetches url over HTTP and parses it with Prometheus' own text
// parser. It returns the raw text too.
func scrape(t *testing.T, url string) (map[string]*dto.MetricFamily, []byte) {
	t.Helper()
	client := &http.Client{Timeout: deadline, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the scrape: %v\n%s", err, body)
	}
	return fams, body
}

// value returns the value of the series of family name whose labels
// include labels (name=value pairs), and whether there is exactly one.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
	var found []*dto.Metric
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		ok := true
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				ok = false
			}
		}
		if ok {
			found = append(found, m)
		}
	}
	if len(found) != 1 {
		return 0, false
	}
	m := found[0]
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount()), true
	}
	return 0, false
}

// want checks one series' value.
func want(t *testing.T, fams map[string]*dto.MetricFamily, v float64, name string, labels ...string) {
	t.Helper()
	got, ok := value(fams, name, labels...)
	if !ok {
		t.Errorf("%s%v: no single series", name, labels)
		return
	}
	if got != v {
		t.Errorf("%s%v = %v, want %v", name, labels, got, v)
	}
}

// instrumented starts a Server with m on 127.0.0.1 and an HTTP server of
// the registry; both are shut down when the test ends.
func instrumented(t *testing.T, cfg sockfsm.Config) (srv *sockfsm.Server, addr, metricsURL string, m *metrics.Metrics) {
	t.Helper()
	m = metrics.New(metrics.Opts{})
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	srv = &sockfsm.Server{Config: cfg, NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} }}
	m.Instrument(&srv.Config)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	hs := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv, ln.Addr().String(), hs.URL, m
}

// tutorialClient sends msg, half-closes, and reads the echo to EOF.
func tutorialClient(t *testing.T, addr, msg string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("echo %q, %v; want %q", got, err, msg)
	}
}

// waitNoConns waits (bounded) until the server has no connection open.
func waitNoConns(t *testing.T, srv *sockfsm.Server) {
	t.Helper()
	for end := time.Now().Add(deadline); srv.NumConns() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("%d connections still open", srv.NumConns())
		}
	}
}

// TestScrapeAfterTutorialConnections: after N tutorial exchanges, a real
// scrape over HTTP, parsed by Prometheus' text parser, says what happened:
// N accepted, N closed because the peer closed, 14N bytes each way, every
// gauge back to zero, N durations, and the edges every one of them took.
// One connection left open shows in the receiving gauge.
func TestScrapeAfterTutorialConnections(t *testing.T) {
	srv, addr, url, _ := instrumented(t, sockfsm.Config{})
	const n = 7
	const msg = "this is a test" // 14 bytes
	const size = float64(len(msg))
	for range n {
		tutorialClient(t, addr, msg)
	}
	waitNoConns(t, srv)

	fams, _ := scrape(t, url)
	want(t, fams, n, "sockfsm_connections_accepted_total")
	want(t, fams, n, "sockfsm_connections_closed_total", "reason", "peer-closed")
	want(t, fams, 0, "sockfsm_connections_closed_total", "reason", "peer-reset")
	want(t, fams, n*size, "sockfsm_received_bytes_total")
	want(t, fams, n*size, "sockfsm_sent_bytes_total")
	want(t, fams, 0, "sockfsm_linger_discarded_bytes_total")
	want(t, fams, n, "sockfsm_linger_endings_total", "ending", "none")
	want(t, fams, n, "sockfsm_connection_duration_seconds")
	for _, s := range fsm.States() {
		if !s.Terminal() {
			want(t, fams, 0, "sockfsm_connections", "state", s.String())
		}
	}
	if _, ok := value(fams, "sockfsm_connections", "state", "closed"); ok {
		t.Error("a gauge for the closed state: closed connections are not open")
	}
	for _, e := range [][3]string{
		{"accepted", "start", "receiving"},
		{"receiving", "output", "sending"},
		{"sending", "flushed", "receiving"},
		{"receiving", "peer-fin", "receiving"},
		{"receiving", "half-close", "half-closing"},
		{"half-closing", "fin-sent", "half-closed"},
		{"half-closed", "close", "closing"},
		{"closing", "close-done", "closed"},
	} {
		want(t, fams, n, "sockfsm_transitions_total", "from", e[0], "event", e[1], "to", e[2])
	}
	want(t, fams, 0, "sockfsm_transitions_total", "from", "sending", "event", "abort", "to", "aborting")
	if got := len(fams["sockfsm_transitions_total"].GetMetric()); got != len(fsm.Transitions()) {
		t.Errorf("%d transition series, want one per edge of the table: %d", got, len(fsm.Transitions()))
	}
	want(t, fams, 0, "sockfsm_accept_errors_total")
	want(t, fams, 0, "sockfsm_max_conns_wait_seconds")

	// One connection open and idle: it is receiving.
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	// The echo came back, but the flushed event may follow it: wait for
	// the connection to be back in receiving (bounded).
	for end := time.Now().Add(deadline); ; time.Sleep(time.Millisecond) {
		fams, _ = scrape(t, url)
		if v, _ := value(fams, "sockfsm_connections", "state", "receiving"); v == 1 || time.Now().After(end) {
			break
		}
	}
	want(t, fams, 1, "sockfsm_connections", "state", "receiving")
	want(t, fams, 0, "sockfsm_connections", "state", "accepted")
	want(t, fams, n+1, "sockfsm_connections_accepted_total")
	want(t, fams, n*size, "sockfsm_received_bytes_total") // counted at close
}

// TestInstrumentChains: Instrument keeps the hooks already set and calls
// them, after its own.
func TestInstrumentChains(t *testing.T) {
	var accepts, changes, closes, errs, waits atomic.Int32
	cfg := sockfsm.Config{
		OnAccept:       func(sockfsm.ConnInfo) { accepts.Add(1) },
		OnStateChange:  func(sockfsm.ConnInfo, fsm.State, fsm.State, fsm.Event) { changes.Add(1) },
		OnClose:        func(sockfsm.ConnInfo, sockfsm.CloseInfo) { closes.Add(1) },
		OnAcceptError:  func(error) { errs.Add(1) },
		OnMaxConnsWait: func(time.Duration) { waits.Add(1) },
	}
	srv, addr, url, _ := instrumented(t, cfg)
	tutorialClient(t, addr, "hello")
	waitNoConns(t, srv)
	// The accept loop's hooks, called as the loop would.
	srv.Config.OnAcceptError(syscall.EMFILE)
	srv.Config.OnMaxConnsWait(1500 * time.Millisecond)

	if accepts.Load() != 1 || changes.Load() < 8 || closes.Load() != 1 || errs.Load() != 1 || waits.Load() != 1 {
		t.Errorf("the hooks set before Instrument ran %d, %d, %d, %d, %d times; want 1, at least 8, 1, 1, 1",
			accepts.Load(), changes.Load(), closes.Load(), errs.Load(), waits.Load())
	}
	fams, _ := scrape(t, url)
	want(t, fams, 1, "sockfsm_connections_accepted_total")
	want(t, fams, 1, "sockfsm_connections_closed_total", "reason", "peer-closed")
	want(t, fams, 1, "sockfsm_accept_errors_total")
	want(t, fams, 1, "sockfsm_max_conns_wait_seconds")
	if h := fams["sockfsm_max_conns_wait_seconds"].GetMetric()[0].GetHistogram(); h.GetSampleSum() != 1.5 {
		t.Errorf("max_conns_wait_seconds sum = %v, want 1.5", h.GetSampleSum())
	}
}

// TestRefused: Refused counts by reason; the reasons of Opts exist at
// zero from the start.
func TestRefused(t *testing.T) {
	m := metrics.New(metrics.Opts{RefuseReasons: []string{"proxy-header", "per-ip-limit"}})
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	m.Refused("per-ip-limit")
	m.Refused("per-ip-limit")
	m.Refused("other")
	fams := gather(t, reg)
	want(t, fams, 0, "sockfsm_refused_total", "reason", "proxy-header")
	want(t, fams, 2, "sockfsm_refused_total", "reason", "per-ip-limit")
	want(t, fams, 1, "sockfsm_refused_total", "reason", "other")
	if a := testing.AllocsPerRun(100, func() { m.Refused("per-ip-limit") }); a != 0 {
		t.Errorf("Refused of a known reason: %v allocs/op, want 0", a)
	}
}

// TestOpts: the namespace, subsystem and constant labels reach the names.
func TestOpts(t *testing.T) {
	m := metrics.New(metrics.Opts{Namespace: "echo", Subsystem: "tcp", ConstLabels: prometheus.Labels{"listener": "a"}})
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	fams := gather(t, reg)
	want(t, fams, 0, "echo_tcp_connections_closed_total", "reason", "peer-closed", "listener", "a")
	if _, ok := fams["sockfsm_connections"]; ok {
		t.Error("the default namespace is used despite Opts.Namespace")
	}
}

// gather returns the registry's families as a scrape would parse them.
func gather(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	fs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, f := range fs {
		out[f.GetName()] = f
	}
	return out
}

// hotPath calls the hooks of a whole tutorial connection on m: every edge
// the tutorial takes, and the close.
func hotPath(m *metrics.Metrics) {
	var c sockfsm.ConnInfo
	m.Accepted(c)
	m.StateChanged(c, fsm.Accepted, fsm.Receiving, fsm.Start)
	m.StateChanged(c, fsm.Receiving, fsm.Receiving, fsm.Input)
	m.StateChanged(c, fsm.Receiving, fsm.Sending, fsm.Output)
	m.StateChanged(c, fsm.Sending, fsm.Receiving, fsm.Flushed)
	m.StateChanged(c, fsm.Receiving, fsm.Receiving, fsm.PeerFIN)
	m.StateChanged(c, fsm.Receiving, fsm.HalfClosing, fsm.HalfClose)
	m.StateChanged(c, fsm.HalfClosing, fsm.HalfClosed, fsm.FINSent)
	m.StateChanged(c, fsm.HalfClosed, fsm.Closing, fsm.Close)
	m.StateChanged(c, fsm.Closing, fsm.Closed, fsm.CloseDone)
	m.Closed(c, sockfsm.CloseInfo{Reason: sockfsm.ReasonPeerClosed, BytesRead: 14, BytesWritten: 14, Duration: 3 * time.Millisecond})
}

// TestHooksAllocateNothing: the hooks a connection calls allocate nothing,
// through the Config they are installed in as well as directly, and for
// every edge of the table.
func TestHooksAllocateNothing(t *testing.T) {
	m := metrics.New(metrics.Opts{})
	if a := testing.AllocsPerRun(1000, func() { hotPath(m) }); a != 0 {
		t.Errorf("a tutorial connection's hooks: %v allocs/op, want 0", a)
	}
	var cfg sockfsm.Config
	m.Instrument(&cfg)
	trs := fsm.Transitions()
	var c sockfsm.ConnInfo
	if a := testing.AllocsPerRun(1000, func() {
		cfg.OnAccept(c)
		for _, tr := range trs {
			cfg.OnStateChange(c, tr.From, tr.To, tr.Event)
		}
		cfg.OnClose(c, sockfsm.CloseInfo{Reason: sockfsm.ReasonWriteTimeout, Linger: sockfsm.LingerEndBytes, BytesRead: 1 << 20, Duration: time.Hour})
	}); a != 0 {
		t.Errorf("every edge through the instrumented Config: %v allocs/op, want 0", a)
	}
}

// BenchmarkStateChanged measures the per-transition hook.
func BenchmarkStateChanged(b *testing.B) {
	m := metrics.New(metrics.Opts{})
	var c sockfsm.ConnInfo
	b.ReportAllocs()
	for b.Loop() {
		m.StateChanged(c, fsm.Receiving, fsm.Sending, fsm.Output)
	}
}

// BenchmarkConnectionHooks measures every hook of one tutorial connection.
func BenchmarkConnectionHooks(b *testing.B) {
	m := metrics.New(metrics.Opts{})
	b.ReportAllocs()
	for b.Loop() {
		hotPath(m)
	}
}

// TestPromtoolCheckMetrics runs Prometheus' own linter, promtool check
// metrics, on a scrape taken after some connections. Skipped where
// promtool is not installed (Debian: apt-get install prometheus).
func TestPromtoolCheckMetrics(t *testing.T) {
	promtool := testutil.Tool(t, "promtool", "prometheus")
	srv, addr, url, m := instrumented(t, sockfsm.Config{})
	tutorialClient(t, addr, "this is a test")
	waitNoConns(t, srv)
	m.Refused("proxy-header")
	_, body := scrape(t, url)
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s\nthe scrape:\n%s", err, out, body)
	}
	if !strings.Contains(string(body), "sockfsm_refused_total") {
		t.Error("the scrape lacks sockfsm_refused_total")
	}
}

// TestRefusalsCounted: Instrument chains Config.OnRefuse, so a connection
// refused over MaxConnsPerIP shows in refused_total under
// sockfsm.RefusalReason's label, and the other reasons exist at zero.
func TestRefusalsCounted(t *testing.T) {
	var prev atomic.Int32
	srv, addr, url, _ := instrumented(t, sockfsm.Config{
		MaxConnsPerIP: 1,
		OnRefuse:      func(net.Addr, error) { prev.Add(1) },
	})
	first, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	second, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := second.Read(make([]byte, 1)); err == nil {
		t.Fatalf("the second connection from one address read %d bytes; want it refused", n)
	}
	first.Close()
	waitNoConns(t, srv)
	fams, _ := scrape(t, url)
	want(t, fams, 1, "sockfsm_refused_total", "reason", "too-many-conns-from-ip")
	want(t, fams, 0, "sockfsm_refused_total", "reason", "proxy-header")
	if prev.Load() != 1 {
		t.Errorf("the OnRefuse set before Instrument ran %d times, want 1", prev.Load())
	}
}
