package main

// Tests that every flag reaches what it sets: the sockfsm.Config of the
// server run builds (through parse and newServer, as run does), run's own
// options, and, for -addr, -log-level and -shutdown-timeout, run's
// behaviour.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// flagCase is one flag, a value for it other than its default, and where
// that value must arrive.
type flagCase struct {
	name, value string
	want        any
	get         func(o options, srv *sockfsm.Server) any
}

func flagCases() []flagCase {
	cfg := func(f func(sockfsm.Config) any) func(options, *sockfsm.Server) any {
		return func(_ options, srv *sockfsm.Server) any { return f(srv.Config) }
	}
	// The values differ from each other and from the defaults, so that a
	// flag wired to another flag's field is caught.
	return []flagCase{
		{"addr", "127.0.0.1:0", "127.0.0.1:0",
			func(o options, _ *sockfsm.Server) any { return o.addr }},
		{"idle-timeout", "7s", 7 * time.Second,
			cfg(func(c sockfsm.Config) any { return c.IdleTimeout })},
		{"write-timeout", "11s", 11 * time.Second,
			cfg(func(c sockfsm.Config) any { return c.WriteTimeout })},
		{"linger-timeout", "3s", 3 * time.Second,
			cfg(func(c sockfsm.Config) any { return c.LingerTimeout })},
		{"linger-time", "13s", 13 * time.Second,
			cfg(func(c sockfsm.Config) any { return c.LingerTime })},
		{"linger-bytes", "12345", int64(12345),
			cfg(func(c sockfsm.Config) any { return c.LingerBytes })},
		{"max-lifetime", "17m", 17 * time.Minute,
			cfg(func(c sockfsm.Config) any { return c.MaxLifetime })},
		{"min-rate", "23", int64(23),
			cfg(func(c sockfsm.Config) any { return c.MinRate })},
		{"min-rate-window", "29s", 29 * time.Second,
			cfg(func(c sockfsm.Config) any { return c.MinRateWindow })},
		{"max-conns", "42", 42,
			cfg(func(c sockfsm.Config) any { return c.MaxConns })},
		{"max-conns-per-ip", "23", 23,
			cfg(func(c sockfsm.Config) any { return c.MaxConnsPerIP })},
		{"proxy-protocol", "required", "required, Prelude set: true",
			func(o options, srv *sockfsm.Server) any {
				return fmt.Sprintf("%v, Prelude set: %v", o.proxy, srv.Config.Prelude != nil)
			}},
		{"shutdown-timeout", "19s", 19 * time.Second,
			func(o options, _ *sockfsm.Server) any { return o.shutdownTimeout }},
		{"log-level", "warn", slog.LevelWarn,
			func(_ options, srv *sockfsm.Server) any { return lowestLevel(srv.Config.Logger) }},
		{"v", "true", "OnStateChange set: true, tutorial handler: true",
			func(_ options, srv *sockfsm.Server) any { return verbosity(srv) }},
		{"driver", "loop", "loop",
			func(o options, _ *sockfsm.Server) any { return o.driver }},
		{"metrics-addr", "127.0.0.1:9464", "127.0.0.1:9464",
			func(o options, _ *sockfsm.Server) any { return o.ops.addr }},
		{"shutdown-delay", "23s", 23 * time.Second,
			func(o options, _ *sockfsm.Server) any { return o.ops.shutdownDelay }},
	}
}

// lowestLevel returns the lowest level l logs, or a string saying why none.
func lowestLevel(l *slog.Logger) any {
	if l == nil {
		return "no logger"
	}
	for _, lv := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		if l.Enabled(context.Background(), lv) {
			return lv
		}
	}
	return "no level enabled"
}

// verbosity says whether srv tells the connections' stories (-v).
func verbosity(srv *sockfsm.Server) string {
	tutorial := false
	if srv.NewHandler != nil {
		_, tutorial = srv.NewHandler(sockfsm.ConnInfo{}).(*tutorialEcho)
	}
	return fmt.Sprintf("OnStateChange set: %v, tutorial handler: %v", srv.Config.OnStateChange != nil, tutorial)
}

// build parses args and builds the server from them, as run does.
func build(t *testing.T, args ...string) (options, *sockfsm.Server) {
	t.Helper()
	var stderr strings.Builder
	o, err := parse(args, &stderr)
	if err != nil {
		t.Fatalf("parse(%q): %v\n%s", args, err, stderr.String())
	}
	return o, newServer(o, io.Discard, io.Discard)
}

// TestFlagsReachServer: each flag, set alone to a value other than its
// default, arrives where it belongs and changes nothing else; all of them
// set together arrive too. The flags are those the usage lists, so that a
// new flag without a case here fails the test.
func TestFlagsReachServer(t *testing.T) {
	cases := append(flagCases(), deployFlagCases()...)

	code, _, usage := runResult(t, "-h")
	if code != 0 {
		t.Fatalf("run(-h) = %d", code)
	}
	var listed, tested []string
	for _, m := range regexp.MustCompile(`(?m)^  -([\w-]+)`).FindAllStringSubmatch(usage, -1) {
		listed = append(listed, m[1])
	}
	for _, c := range cases {
		tested = append(tested, c.name)
	}
	slices.Sort(listed)
	slices.Sort(tested)
	if !slices.Equal(listed, tested) {
		t.Errorf("the usage lists the flags %q; this test checks %q", listed, tested)
	}

	defO, defSrv := build(t)
	var all []string
	for _, c := range cases {
		arg := "-" + c.name + "=" + c.value
		all = append(all, arg)
		if got := c.get(defO, defSrv); got == c.want {
			t.Errorf("-%s: the default is already %v; the test needs another value", c.name, got)
		}
		o, srv := build(t, arg)
		for _, d := range cases {
			want := d.get(defO, defSrv)
			if d.name == c.name {
				want = d.want
			}
			if got := d.get(o, srv); got != want {
				t.Errorf("with %s: -%s's setting is %v, want %v", arg, d.name, got, want)
			}
		}
	}
	o, srv := build(t, all...)
	for _, c := range cases {
		if got := c.get(o, srv); got != c.want {
			t.Errorf("with every flag set: -%s's setting is %v, want %v", c.name, got, c.want)
		}
	}
}

// TestDefaultFlags: with no flags, the server is the tutorial's: the plain
// echo handler on localhost:27015, logging at info level to stderr.
func TestDefaultFlags(t *testing.T) {
	o, err := parse(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.addr != "localhost:27015" {
		t.Errorf("the default address is %q, want the tutorial's localhost:27015", o.addr)
	}
	var stderr syncBuffer
	srv := newServer(o, io.Discard, &stderr)
	if got := verbosity(srv); got != "OnStateChange set: false, tutorial handler: false" {
		t.Errorf("without -v: %s", got)
	}
	if srv.NewHandler == nil || srv.NewHandler(sockfsm.ConnInfo{}) == nil {
		t.Fatal("no handler")
	}
	if got := lowestLevel(srv.Config.Logger); got != slog.LevelInfo {
		t.Errorf("the default log level is %v, want INFO", got)
	}
	srv.Config.Logger.Info("probe")
	if !strings.Contains(stderr.String(), "msg=probe") {
		t.Errorf("the server's logger does not write to stderr: %q", stderr.String())
	}
	if err := srv.Config.Validate(); err != nil {
		t.Errorf("the default Config: %v", err)
	}
}

// TestRunHonoursFlags: run listens on -addr, logs at -log-level, and
// aborts a connection still open -shutdown-timeout after the signal.
//
// The connection is idle when the signal comes: the server half-closes it
// and lingers for the client's FIN, which never comes. Its linger ends
// either at the shutdown deadline (50ms after the signal: aborted, reason
// shutdown-deadline) or at -linger-timeout (5s after our FIN: closed,
// reason linger-timeout). The first is right; the second would mean the
// server ignored -shutdown-timeout (its default, 10s, comes later). It is
// the order of two of the server's own deadlines, not a measured time.
func TestRunHonoursFlags(t *testing.T) {
	var stdout, stderr syncBuffer
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	done := make(chan int, 1)
	args := []string{"-addr", "127.0.0.1:0", "-v", "-log-level", "warn",
		"-shutdown-timeout", "50ms", "-linger-timeout", "5s", "-linger-time", "5s"}
	go func() { done <- run(args, &stdout, &stderr, sigs, ready) }()
	var addr net.Addr
	select {
	case addr = <-ready:
	case code := <-done:
		t.Fatalf("run returned %d before listening; stderr:\n%s", code, stderr.String())
	case <-time.After(deadline):
		t.Fatal("the server did not start")
	}
	ta, ok := addr.(*net.TCPAddr)
	if !ok || !ta.IP.Equal(net.IPv4(127, 0, 0, 1)) || ta.Port == 27015 || ta.Port == 0 {
		t.Errorf("listening on %v, want 127.0.0.1 and the port the system chose (-addr 127.0.0.1:0)", addr)
	}

	c, err := net.DialTimeout("tcp", addr.String(), deadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("reading the echo: %v", err)
	}

	sigs <- syscall.SIGTERM
	// The server's FIN, then its RST; or the RST alone if the deadline came
	// before the half-close. The client never sends its FIN.
	if _, err := io.Copy(io.Discard, c); err != nil && !isReset(err) {
		t.Errorf("after the signal: %v, want EOF or a reset", err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run returned %d, want 0", code)
		}
	case <-time.After(deadline):
		t.Fatal("run did not return after SIGTERM")
	}

	want := fmt.Sprintf("Connection aborted (RST): reason %s", sockfsm.ReasonShutdownDeadline)
	if story := stdout.String(); !strings.Contains(story, want) {
		t.Errorf("the story lacks %q: -shutdown-timeout not applied?\n%s", want, story)
	}
	logs := stderr.String()
	if !strings.Contains(logs, "shutdown deadline passed") {
		t.Errorf("the log lacks the warning %q:\n%s", "shutdown deadline passed", logs)
	}
	for _, info := range []string{"msg=listening", "msg=\"server stopped\""} {
		if strings.Contains(logs, info) {
			t.Errorf("with -log-level warn, the log has the info line %s:\n%s", info, logs)
		}
	}
}
