package admit

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
)

func TestLimiter(t *testing.T) {
	l := New(2)
	a, b := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")
	for i := range 2 {
		if !l.Acquire(a) {
			t.Fatalf("connection %d from a was refused at a limit of 2", i+1)
		}
	}
	if l.Acquire(a) {
		t.Fatal("a third connection from a was admitted at a limit of 2")
	}
	if got := l.Open(a); got != 2 {
		t.Fatalf("Open(a) = %d after a refusal, want 2: a refusal must count nothing", got)
	}
	if !l.Acquire(b) {
		t.Fatal("b was refused because of a")
	}
	l.Release(a)
	if !l.Acquire(a) {
		t.Fatal("a was refused after one of its connections was released")
	}
	l.Release(a)
	l.Release(a)
	l.Release(b)
	if n := l.Addrs(); n != 0 {
		t.Fatalf("%d addresses still counted after every release: the map leaks", n)
	}
}

func TestLimiterReleaseWithoutAcquirePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("Release without Acquire did not panic: a double release would go unnoticed")
		}
	}()
	New(1).Release(netip.MustParseAddr("127.0.0.2"))
}

func TestNilLimiterAdmitsAll(t *testing.T) {
	var l *Limiter = New(0)
	if l != nil {
		t.Fatal("New(0) is not nil: 0 must mean unlimited")
	}
	a := netip.MustParseAddr("127.0.0.2")
	for range 1000 {
		if !l.Acquire(a) {
			t.Fatal("a nil Limiter refused")
		}
	}
	l.Release(a)
}

func TestLimiterConcurrent(t *testing.T) {
	const max, tries = 5, 64
	l := New(max)
	a := netip.MustParseAddr("10.0.0.1")
	var wg sync.WaitGroup
	admitted := make(chan bool, tries)
	for range tries {
		wg.Go(func() { admitted <- l.Acquire(a) })
	}
	wg.Wait()
	close(admitted)
	n := 0
	for ok := range admitted {
		if ok {
			n++
		}
	}
	if n != max {
		t.Fatalf("%d of %d concurrent acquires admitted, want exactly %d", n, tries, max)
	}
}

func TestKey(t *testing.T) {
	for _, c := range []struct {
		addr net.Addr
		want string
		ok   bool
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 5), Port: 1}, "127.0.0.5", true},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.1.2.3"), Port: 1}, "10.1.2.3", true},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 1}, "2001:db8::1", true},
		{&net.UnixAddr{Name: "/tmp/x", Net: "unix"}, "", false},
		// A Unix peer bound to a path that reads as an address is no IP
		// peer: the loop driver counts it by its socket address at accept
		// (not at all) and releases it by this key.
		{&net.UnixAddr{Name: "1.2.3.4:80", Net: "unix"}, "", false},
		{nil, "", false},
	} {
		k, ok := Key(c.addr)
		if ok != c.ok || (ok && k.String() != c.want) {
			t.Errorf("Key(%v) = %v, %v; want %s, %v", c.addr, k, ok, c.want, c.ok)
		}
	}
	// Two ports of one address share a key.
	k1, _ := Key(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 1000})
	k2, _ := Key(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 2000})
	if k1 != k2 {
		t.Errorf("two ports of 127.0.0.2 have different keys %v and %v", k1, k2)
	}
}

func TestRefuse(t *testing.T) {
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, nil))
	remote := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 9), Port: 4242}
	reason := errors.New("sockfsm: too many connections from one address")
	var got []string
	Refuse(log, func(a net.Addr, err error) { got = append(got, a.String()+" "+err.Error()) }, remote, reason)
	if want := []string{"127.0.0.9:4242 " + reason.Error()}; !slices.Equal(got, want) {
		t.Errorf("OnRefuse got %q, want %q", got, want)
	}
	if n := strings.Count(logs.String(), "level=WARN msg=\"connection refused\" remote=127.0.0.9:4242"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, logs.String())
	}
	// A panicking hook is logged, not propagated; a nil one is fine.
	Refuse(log, func(net.Addr, error) { panic("boom") }, remote, reason)
	Refuse(log, nil, nil, reason)
	if !strings.Contains(logs.String(), "OnRefuse panicked") || !strings.Contains(logs.String(), "remote=unknown") {
		t.Errorf("log:\n%s", logs.String())
	}
}
