package probe

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

// testDeadline bounds every wait here; it is a bound, not a timing assertion.
const testDeadline = 10 * time.Second

func TestCheckLoopback(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "127.3.2.1:80", "[::1]:27015", "localhost:27015"} {
		if err := CheckLoopback(addr); err != nil {
			t.Errorf("CheckLoopback(%q) = %v", addr, err)
		}
	}
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:7", "10.0.0.1:80", "example.com:80", "[2001:db8::1]:80"} {
		if err := CheckLoopback(addr); !errors.Is(err, ErrNotLoopback) {
			t.Errorf("CheckLoopback(%q) = %v, want ErrNotLoopback", addr, err)
		}
	}
	if err := CheckLoopback("127.0.0.1"); err == nil || errors.Is(err, ErrNotLoopback) {
		t.Errorf("no port: %v, want a parse error", err)
	}
}

func TestResolveLoopback(t *testing.T) {
	ctx := context.Background()
	for addr, want := range map[string]string{"127.0.0.1:7": "127.0.0.1:7", "[::1]:7": "[::1]:7"} {
		if got, err := ResolveLoopback(ctx, addr); err != nil || got != want {
			t.Errorf("ResolveLoopback(%q) = %q, %v; want %q", addr, got, err, want)
		}
	}
	if got, err := ResolveLoopback(ctx, "localhost:7"); err != nil {
		t.Logf("localhost does not resolve here: %v", err)
	} else if host, _, _ := net.SplitHostPort(got); !net.ParseIP(host).IsLoopback() {
		t.Errorf("localhost resolved to %q", got)
	}
	for _, addr := range []string{"192.0.2.1:7", "0.0.0.0:7", ":7"} {
		if got, err := ResolveLoopback(ctx, addr); err == nil {
			t.Errorf("ResolveLoopback(%q) = %q, want a refusal", addr, got)
		}
	}
}

// TestIsReset: a real reset over loopback is a reset and not a timeout; a
// passed deadline is a timeout and not a reset.
func TestIsReset(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(testDeadline))
	s.(*net.TCPConn).SetLinger(0)
	s.Close() // SO_LINGER 0: RST
	_, err = c.Read(make([]byte, 1))
	if !IsReset(err) || IsTimeout(err) {
		t.Errorf("read after the peer's RST: %v: IsReset %v, IsTimeout %v", err, IsReset(err), IsTimeout(err))
	}

	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	a.SetReadDeadline(time.Now().Add(-time.Second))
	_, err = a.Read(make([]byte, 1))
	if !IsTimeout(err) || IsReset(err) {
		t.Errorf("read past its deadline: %v: IsTimeout %v, IsReset %v", err, IsTimeout(err), IsReset(err))
	}
	if IsReset(io.EOF) || IsTimeout(io.EOF) {
		t.Error("EOF is neither")
	}
}

func TestProc(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("/proc is Linux's")
	}
	pid := os.Getpid()
	s, err := ReadStatus(pid)
	if err != nil || s.RSSKiB <= 0 || s.HWMKiB < s.RSSKiB || s.Threads < 1 {
		t.Fatalf("ReadStatus = %+v, %v", s, err)
	}
	if rss, err := RSS(pid); err != nil || rss <= 0 {
		t.Errorf("RSS = %d, %v", rss, err)
	}
	n0, err := FDs(pid)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	n1, err := FDs(pid)
	f.Close()
	if err != nil || n1 != n0+1 {
		t.Errorf("FDs: %d, then %d with one more file open (%v)", n0, n1, err)
	}
	c0, err := CPUTime(pid)
	if err != nil || c0 < 0 {
		t.Fatalf("CPUTime = %v, %v", c0, err)
	}
	if c1, err := CPUTime(pid); err != nil || c1 < c0 {
		t.Errorf("CPUTime went from %v to %v (%v)", c0, c1, err)
	}
	if _, err := ReadStatus(-1); err == nil {
		t.Error("ReadStatus(-1): no error")
	}
}

func TestParseStatCPU(t *testing.T) {
	// A command name with spaces and a parenthesis: the fields are counted
	// after the last ')'. utime 250 and stime 50 ticks: 3 s.
	stat := []byte("42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 1000 200")
	if d, err := parseStatCPU(42, stat); err != nil || d != 3*time.Second {
		t.Errorf("parseStatCPU = %v, %v; want 3s", d, err)
	}
	for _, bad := range []string{"42 no parenthesis", "42 (x) S 1 2", "42 (x) S 1 42 42 0 -1 4194560 100 0 0 0 x 50"} {
		if d, err := parseStatCPU(42, []byte(bad)); err == nil {
			t.Errorf("parseStatCPU(%q) = %v, want an error", bad, d)
		}
	}
}
