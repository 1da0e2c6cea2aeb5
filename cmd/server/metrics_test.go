package main

// Tests of the operations endpoint (metrics.go): a real scrape of /metrics
// parsed by Prometheus' own parser (and linted by promtool where it is
// installed), /healthz and /readyz, and /readyz failing while the echo
// listener still accepts.

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/internal/testutil"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// httpClient makes one connection per request, so that no idle connection
// outlives a test (goleak).
var httpClient = &http.Client{Timeout: deadline, Transport: &http.Transport{DisableKeepAlives: true}}

// get fetches url and returns its status code and body.
func get(t *testing.T, url string) (int, []byte) {
	t.Helper()
	resp, err := httpClient.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, body
}

// scrapeMetrics fetches /metrics and parses it with Prometheus' text
// parser; it returns the raw text too.
func scrapeMetrics(t *testing.T, base string) (map[string]*dto.MetricFamily, []byte) {
	t.Helper()
	code, body := get(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", code, body)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	return fams, body
}

// sample returns the value of the single series of family name whose
// labels include the name=value pairs given; ok is false if there is not
// exactly one.
func sample(fams map[string]*dto.MetricFamily, name string, labels ...string) (v float64, ok bool) {
	n := 0
	for _, m := range fams[name].GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			match = match && have[labels[i]] == labels[i+1]
		}
		if !match {
			continue
		}
		n++
		switch {
		case m.Counter != nil:
			v = m.Counter.GetValue()
		case m.Gauge != nil:
			v = m.Gauge.GetValue()
		case m.Histogram != nil:
			v = float64(m.Histogram.GetSampleCount())
		}
	}
	return v, n == 1
}

// openConns sums the open-connection gauge over the states.
func openConns(fams map[string]*dto.MetricFamily) float64 {
	sum := 0.0
	for _, m := range fams["sockfsm_connections"].GetMetric() {
		sum += m.GetGauge().GetValue()
	}
	return sum
}

// startWithMetrics runs run(args) with -metrics-addr on a free port and
// returns the echo address, the metrics base URL, the signal channel and
// run's result.
func startWithMetrics(t *testing.T, args ...string) (echo string, base string, sigs chan<- os.Signal, done <-chan int, stderr *syncBuffer) {
	t.Helper()
	stderr = &syncBuffer{}
	var stdout syncBuffer
	s := make(chan os.Signal, 2)
	ready := make(chan net.Addr, 1)
	d := make(chan int, 1)
	args = append([]string{"-addr", "127.0.0.1:0", "-metrics-addr", "127.0.0.1:0"}, args...)
	go func() { d <- run(args, &stdout, stderr, s, ready) }()
	select {
	case a := <-ready:
		echo = a.String()
	case code := <-d:
		t.Fatalf("run returned %d before listening; stderr:\n%s", code, stderr.String())
	case <-time.After(deadline):
		t.Fatal("the server did not start")
	}
	// The metrics server listens before the echo listeners: its log line
	// is there already.
	m := regexp.MustCompile(`msg="metrics listening" addr=(\S+)`).FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", stderr.String())
	}
	return echo, "http://" + m[1], s, d, stderr
}

// waitExit waits (bounded) for run to return and checks its exit code.
func waitExit(t *testing.T, done <-chan int, stderr *syncBuffer) {
	t.Helper()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run returned %d, want 0; stderr:\n%s", code, stderr.String())
		}
	case <-time.After(deadline):
		t.Fatalf("run did not return; stderr:\n%s", stderr.String())
	}
}

// TestMetricsEndpoint: after N tutorial exchanges, /metrics scraped over
// HTTP and parsed by Prometheus' text parser says N connections were
// accepted and closed because the peer closed, 14 bytes each way each,
// none open; /healthz and /readyz answer 200; promtool, where installed,
// finds nothing to say about the scrape. After SIGTERM, run returns and
// the metrics port is closed.
func TestMetricsEndpoint(t *testing.T) {
	echo, base, sigs, done, stderr := startWithMetrics(t)
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := get(t, base+path); code != http.StatusOK {
			t.Errorf("GET %s while serving: %d %s", path, code, body)
		}
	}
	const n = 5
	msg := []byte("this is a test")
	for range n {
		if got, err := exchange(echo, msg); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("exchange: %q, %v", got, err)
		}
	}
	// The client has our FIN; the server's close follows: wait for it.
	fams, body := scrapeMetrics(t, base)
	for end := time.Now().Add(deadline); openConns(fams) != 0 && time.Now().Before(end); time.Sleep(time.Millisecond) {
		fams, body = scrapeMetrics(t, base)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"sockfsm_connections", []string{"state", "receiving"}, 0},
		{"sockfsm_connections", []string{"state", "half-closed"}, 0},
		{"sockfsm_connections_accepted_total", nil, n},
		{"sockfsm_connections_closed_total", []string{"reason", "peer-closed"}, n},
		{"sockfsm_connections_closed_total", []string{"reason", "shutdown"}, 0},
		{"sockfsm_received_bytes_total", nil, n * 14},
		{"sockfsm_sent_bytes_total", nil, n * 14},
		{"sockfsm_connection_duration_seconds", nil, n},
		{"sockfsm_transitions_total", []string{"from", "receiving", "event", "peer-fin"}, n},
		{"sockfsm_accept_errors_total", nil, 0},
	} {
		if got, ok := sample(fams, c.name, c.labels...); !ok || got != c.want {
			t.Errorf("%s%v = %v (found: %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	if _, ok := sample(fams, "go_goroutines"); !ok {
		t.Error("no go_goroutines: the Go collector is not registered")
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = bytes.NewReader(body)
		if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else if os.Getenv(testutil.RequireToolsEnv) != "" {
		t.Errorf("promtool not installed (Debian package prometheus), and %s is set", testutil.RequireToolsEnv)
	} else {
		t.Log("promtool not installed (Debian package prometheus): the scrape is not linted")
	}

	sigs <- syscall.SIGTERM
	waitExit(t, done, stderr)
	if c, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), deadline); err == nil {
		c.Close()
		t.Error("the metrics port still accepts after run returned")
	}
}

// TestReadyzFailsBeforeListenersClose: with -shutdown-delay, a SIGTERM
// turns /readyz to 503 while the echo listener still accepts and serves
// new connections: a load balancer that polls /readyz stops sending before
// the listener closes. /healthz stays 200. A second signal ends the delay
// and the server exits 0. The order is shown by what is observed (a new
// connection served after /readyz said 503), not by timing.
func TestReadyzFailsBeforeListenersClose(t *testing.T) {
	echo, base, sigs, done, stderr := startWithMetrics(t, "-shutdown-delay", "1h")
	if code, _ := get(t, base+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz while serving: %d", code)
	}
	sigs <- syscall.SIGTERM
	code := 0
	for end := time.Now().Add(deadline); code != http.StatusServiceUnavailable && time.Now().Before(end); time.Sleep(time.Millisecond) {
		code, _ = get(t, base+"/readyz")
	}
	if code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz after SIGTERM: %d, want 503", code)
	}
	// Not ready, and still serving: a new connection gets its echo.
	msg := []byte("still here")
	if got, err := exchange(echo, msg); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("a connection after /readyz turned 503: %q, %v; want its echo", got, err)
	}
	if code, _ := get(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz during the shutdown delay: %d, want 200", code)
	}
	fams, _ := scrapeMetrics(t, base)
	if got, _ := sample(fams, "sockfsm_connections_accepted_total"); got != 1 {
		t.Errorf("accepted_total = %v, want 1", got)
	}

	sigs <- syscall.SIGTERM // ends the delay, and closes whatever is open
	waitExit(t, done, stderr)
	if c, err := net.DialTimeout("tcp", echo, deadline); err == nil {
		c.Close()
		t.Error("the echo listener still accepts after run returned")
	}
}

// TestMetricsFlags: a negative -shutdown-delay is a usage error (exit 2); a
// -metrics-addr the server cannot listen on exits 1 with a one-line error.
func TestMetricsFlags(t *testing.T) {
	code, _, stderr := runResult(t, "-shutdown-delay", "-1s")
	if code != 2 || !strings.Contains(stderr, "-shutdown-delay must not be negative") {
		t.Errorf("-shutdown-delay -1s: %d, stderr:\n%s", code, stderr)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, addr := range []string{ln.Addr().String(), "nonsense"} {
		code, _, stderr := runResult(t, "-addr", "127.0.0.1:0", "-metrics-addr", addr)
		if code != 1 || !strings.HasPrefix(stderr, "server: -metrics-addr: ") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("-metrics-addr %s: %d, stderr %q; want 1 and a one-line error", addr, code, stderr)
		}
	}
}
