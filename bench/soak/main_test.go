package main

import (
	"context"
	"errors"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
)

// TestMain fails the run if a goroutine outlives the tests.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds every wait in these tests.
const deadline = 60 * time.Second

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer = testutil.SyncBuffer

func runSoak(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(context.Background(), args, &out, &errb) }()
	select {
	case code := <-done:
		return code, out.String(), errb.String()
	case <-time.After(deadline):
		t.Fatalf("soak %q did not return", args)
		return 0, "", ""
	}
}

// TestRefusesNonLoopback: soak sends nothing anywhere but to loopback
// addresses; other addresses are refused before any dial.
func TestRefusesNonLoopback(t *testing.T) {
	for _, addr := range []string{"192.0.2.1:27015", "10.0.0.1:80", "[2001:db8::1]:80", "0.0.0.0:27015", ":27015"} {
		code, stdout, stderr := runSoak(t, "-addr", addr, "-n", "1")
		if code != 2 || !strings.Contains(stderr, "soak: -addr") {
			t.Errorf("soak -addr %s = %d, stderr %q; want 2 and a refusal", addr, code, stderr)
		}
		if stdout != "" {
			t.Errorf("soak -addr %s ran: %q", addr, stdout)
		}
	}
}

// TestFlags: bad command lines exit 2, -h exits 0.
func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-n", "0"}, 2, "must be bounded"},
		{[]string{"-mix", "good=1,bogus=2"}, 2, `unknown kind "bogus"`},
		{[]string{"-mix", "good=0"}, 2, "every weight is zero"},
		{[]string{"-mix", "good"}, 2, "not kind=weight"},
		{[]string{"-c", "0"}, 2, "-c must be at least 1"},
		{[]string{"-duration", "25h"}, 2, "-duration is at most"},
		{[]string{"-nope"}, 2, "flag provided but not defined"},
		{[]string{"extra"}, 2, "unexpected arguments"},
		{[]string{"-h"}, 0, "Usage: soak"},
	} {
		code, _, stderr := runSoak(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("soak %q = %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
}

var summary = regexp.MustCompile(`(?m)^soak lifecycles=(\d+) graceful=(\d+) resets_on_graceful=(\d+) peak_fds=(-?\d+) peak_rss_kib=(-?\d+) peak_threads=(-?\d+) failures=(\d+) seconds=[\d.]+$`)

// TestSoak runs every kind of lifecycle against an echo server with short
// timeouts, in this process (so -pid samples this process): no lifecycle
// fails, none of the graceful ones sees a reset, and the summary line is
// complete.
func TestSoak(t *testing.T) {
	srv := &sockfsm.Server{
		Config: sockfsm.Config{
			IdleTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond,
			LingerTimeout: 500 * time.Millisecond, LingerTime: time.Second, MaxLifetime: time.Second,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} },
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()

	code, stdout, stderr := runSoak(t, "-addr", ln.Addr().String(), "-n", "120", "-c", "12", "-seed", "1",
		"-mix", "good=4,idle=1,nofin=1,slowread=1,reset=2,trickle=1",
		"-timeout", "20s", "-hold", "100ms", "-trickle-interval", "20ms", "-max-msg", "16384",
		"-pid", strconv.Itoa(os.Getpid()), "-v")
	t.Logf("soak's report:\n%s%s", stdout, stderr)
	if code != 0 {
		t.Errorf("soak exited %d, want 0", code)
	}
	m := summary.FindStringSubmatch(stdout)
	if m == nil {
		t.Fatalf("no summary line in:\n%s", stdout)
	}
	if last := strings.TrimRight(stdout, "\n"); !strings.HasSuffix(last, m[0]) {
		t.Errorf("the summary line is not the last line")
	}
	n := func(i int) int { v, _ := strconv.Atoi(m[i]); return v }
	if n(1) != 120 || n(3) != 0 || n(7) != 0 {
		t.Errorf("lifecycles=%d resets_on_graceful=%d failures=%d; want 120, 0, 0", n(1), n(3), n(7))
	}
	if runtime.GOOS == "linux" && (n(4) <= 0 || n(5) <= 0 || n(6) <= 0) {
		t.Errorf("peak_fds=%d peak_rss_kib=%d peak_threads=%d; want them sampled", n(4), n(5), n(6))
	}
	for _, kind := range kinds {
		if !regexp.MustCompile(`(?m)^  ` + kind + ` `).MatchString(stdout) {
			t.Errorf("no %s lifecycle ran", kind)
		}
	}
}

// TestSoakSeesResets: against a server that resets every connection, the
// graceful lifecycles report their resets and soak exits 1.
func TestSoakSeesResets(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				// Read something, then reset.
				c.SetDeadline(time.Now().Add(deadline))
				io.ReadAtLeast(c, make([]byte, 1), 1)
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			})
		}
	})
	code, stdout, _ := runSoak(t, "-addr", ln.Addr().String(), "-n", "10", "-c", "2", "-mix", "good=1", "-timeout", "10s")
	m := summary.FindStringSubmatch(stdout)
	if code != 1 || m == nil || m[3] != "10" {
		t.Errorf("soak against a resetting server = %d, summary %q; want 1 and resets_on_graceful=10\n%s", code, m, stdout)
	}
}
