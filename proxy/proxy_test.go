package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"github.com/sockfsm/sockfsm/loop"
	"github.com/sockfsm/sockfsm/proxy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds every wait of these tests.
const deadline = 10 * time.Second

// driver is a server of either driver: sockfsm.Server, which serves the
// connection the prelude returns, or loop.Server, which serves the socket
// itself with that connection's addresses.
type driver struct {
	name string
	new  func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) serverAPI
}

type serverAPI interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	NumConns() int
}

var drivers = []driver{
	{"goroutine", func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) serverAPI {
		return &sockfsm.Server{Config: cfg, NewHandler: nh}
	}},
	{"loop", func(cfg sockfsm.Config, nh func(sockfsm.ConnInfo) sockfsm.Handler) serverAPI {
		return &loop.Server{Config: cfg, NewHandler: nh, Loops: 2}
	}},
}

// forDrivers runs test on each driver.
func forDrivers(t *testing.T, test func(*testing.T, driver)) {
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) { test(t, d) })
	}
}

// server is a sockfsm echo server with a PROXY prelude, recording each
// connection's ConnInfo and each refusal.
type server struct {
	addr string
	srv  serverAPI
	logs *testutil.SyncBuffer

	mu      sync.Mutex
	infos   []sockfsm.ConnInfo
	refused []refusal
}

type refusal struct {
	remote net.Addr
	reason error
}

func startServer(t *testing.T, d driver, mode proxy.Mode, cfg sockfsm.Config) *server {
	t.Helper()
	s := &server{logs: &testutil.SyncBuffer{}}
	cfg.Prelude = proxy.Prelude(mode)
	cfg.Logger = slog.New(slog.NewTextHandler(s.logs, nil))
	cfg.OnRefuse = func(remote net.Addr, reason error) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.refused = append(s.refused, refusal{remote, reason})
	}
	s.srv = d.new(cfg, func(ci sockfsm.ConnInfo) sockfsm.Handler {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.infos = append(s.infos, ci)
		return sockfsm.Echo{}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- s.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", s.logs.String())
		}
	})
	return s
}

func (s *server) refusals() []refusal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]refusal(nil), s.refused...)
}

func (s *server) lastInfo(t *testing.T) sockfsm.ConnInfo {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.infos) == 0 {
		t.Fatal("no connection was served")
	}
	return s.infos[len(s.infos)-1]
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(deadline))
	return c
}

func header(t *testing.T, version byte, src, dst string) []byte {
	t.Helper()
	s, d := net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)), net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst))
	tp := proxyproto.TCPv4
	if s.IP.To4() == nil {
		tp = proxyproto.TCPv6
	}
	h := &proxyproto.Header{Version: version, Command: proxyproto.PROXY, TransportProtocol: tp, SourceAddr: s, DestinationAddr: d}
	if version == 2 {
		// A TLV, as HAProxy's send-proxy-v2-ssl or AWS would add.
		if err := h.SetTLVs([]proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("example.com")}}); err != nil {
			t.Fatal(err)
		}
	}
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// tutorial runs the tutorial's client flow on c after writing pre: send
// msg, half-close, read the echo to the server's FIN.
func tutorial(t *testing.T, c net.Conn, pre []byte, msg string) {
	t.Helper()
	if _, err := c.Write(append(append([]byte(nil), pre...), msg...)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the echo: %v after %q", err, got)
	}
	if string(got) != msg {
		t.Fatalf("echo %q, want %q: the prelude ate or kept bytes of the data", got, msg)
	}
}

// TestHeaderGivesClientAddress: with a v1 or v2 header in the same segment
// as the data, ConnInfo has the header's addresses and the data is echoed
// whole.
func TestHeaderGivesClientAddress(t *testing.T) { forDrivers(t, testHeaderGivesClientAddress) }

func testHeaderGivesClientAddress(t *testing.T, d driver) {
	for _, tc := range []struct {
		name     string
		version  byte
		src, dst string
	}{
		{"v1 tcp4", 1, "203.0.113.7:40001", "198.51.100.1:443"},
		{"v2 tcp4", 2, "203.0.113.8:40002", "198.51.100.1:443"},
		{"v1 tcp6", 1, "[2001:db8::7]:40003", "[2001:db8::1]:443"},
		{"v2 tcp6", 2, "[2001:db8::8]:40004", "[2001:db8::1]:443"},
	} {
		for _, mode := range []proxy.Mode{proxy.Required, proxy.Optional} {
			t.Run(tc.name+" "+mode.String(), func(t *testing.T) {
				s := startServer(t, d, mode, sockfsm.Config{})
				c := dial(t, s.addr)
				tutorial(t, c, header(t, tc.version, tc.src, tc.dst), "this is a test")
				ci := s.lastInfo(t)
				if ci.RemoteAddr.String() != tc.src || ci.LocalAddr.String() != tc.dst {
					t.Errorf("ConnInfo has %v -> %v, want the header's %s -> %s", ci.RemoteAddr, ci.LocalAddr, tc.src, tc.dst)
				}
				if r := s.refusals(); len(r) != 0 {
					t.Errorf("refusals: %v", r)
				}
			})
		}
	}
}

// TestHeaderInPieces: a header that arrives a few bytes at a time is read
// whole, and not a byte further.
func TestHeaderInPieces(t *testing.T) { forDrivers(t, testHeaderInPieces) }

func testHeaderInPieces(t *testing.T, d driver) {
	for _, version := range []byte{1, 2} {
		s := startServer(t, d, proxy.Required, sockfsm.Config{})
		c := dial(t, s.addr)
		h := header(t, version, "203.0.113.9:5000", "198.51.100.1:80")
		for i := 0; i < len(h); i += 3 {
			if _, err := c.Write(h[i:min(i+3, len(h))]); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond) // separate segments, most likely
		}
		tutorial(t, c, nil, "after the header")
		if got := s.lastInfo(t).RemoteAddr.String(); got != "203.0.113.9:5000" {
			t.Errorf("v%d: RemoteAddr %s", version, got)
		}
	}
}

// TestLocalAndUnknownKeepPeer: a v2 LOCAL header (a proxy's health check)
// and a v1 UNKNOWN one leave the peer's own address.
func TestLocalAndUnknownKeepPeer(t *testing.T) { forDrivers(t, testLocalAndUnknownKeepPeer) }

func testLocalAndUnknownKeepPeer(t *testing.T, d driver) {
	local := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	lb, err := local.Format()
	if err != nil {
		t.Fatal(err)
	}
	for name, h := range map[string][]byte{"v2 LOCAL": lb, "v1 UNKNOWN": []byte("PROXY UNKNOWN\r\n")} {
		s := startServer(t, d, proxy.Required, sockfsm.Config{})
		c := dial(t, s.addr)
		tutorial(t, c, h, "health")
		if got, want := s.lastInfo(t).RemoteAddr.String(), c.LocalAddr().String(); got != want {
			t.Errorf("%s: RemoteAddr %s, want the peer's %s", name, got, want)
		}
	}
}

// TestRequiredRefuses: without a valid header, a connection is closed
// unserved, reported once with ErrProxyHeader, and logged once; a
// connection served meanwhile is not affected.
func TestRequiredRefuses(t *testing.T) { forDrivers(t, testRequiredRefuses) }

func testRequiredRefuses(t *testing.T, d driver) {
	s := startServer(t, d, proxy.Required, sockfsm.Config{PreludeTimeout: 300 * time.Millisecond})
	good := dial(t, s.addr)
	if _, err := good.Write(header(t, 2, "203.0.113.1:1", "198.51.100.1:2")); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"no header":       []byte("this is a test"),
		"bad v1":          []byte("PROXY TCP4 not-an-address 1.2.3.4 1 2\r\nthis is a test"),
		"v1 without CRLF": []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nthis is a test"),
		"bad v2 version":  append(append([]byte(nil), proxyproto.SIGV2...), 0x31, 0x11, 0, 0),
		"truncated":       []byte("PROXY TCP4 1.2.3.4"), // then silence: refused at PreludeTimeout
		"silent":          nil,
	}
	for name, data := range cases {
		c := dial(t, s.addr)
		if data != nil {
			if _, err := c.Write(data); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
		n, err := io.Copy(io.Discard, c)
		if n != 0 || (err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err)) {
			t.Errorf("%s: read %d bytes, %v; want the server's close and nothing else", name, n, err)
		}
	}
	r := s.waitRefusals(t, len(cases))
	if len(r) != len(cases) {
		t.Fatalf("%d refusals, want %d: %v", len(r), len(cases), r)
	}
	for _, f := range r {
		if !errors.Is(f.reason, sockfsm.ErrProxyHeader) {
			t.Errorf("refused with %v, want ErrProxyHeader", f.reason)
		}
	}
	if n := bytes.Count([]byte(s.logs.String()), []byte("connection refused")); n != len(cases) {
		t.Errorf("%d refusals logged, want one each (%d):\n%s", n, len(cases), s.logs.String())
	}
	tutorial(t, good, nil, "unaffected")
}

// isReset: the server closed with the client's bytes unread, so the
// kernel answered with RST. Expected of a refusal.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// waitRefusals waits (bounded) until n refusals were reported: the client
// sees the close before OnRefuse is called.
func (s *server) waitRefusals(t *testing.T, n int) []refusal {
	t.Helper()
	end := time.Now().Add(deadline)
	for len(s.refusals()) < n && time.Now().Before(end) {
		time.Sleep(time.Millisecond)
	}
	return s.refusals()
}

// TestOptionalWithoutHeader: in optional mode a connection without a
// header is served with the peer's address and every byte, even data that
// begins like a signature. (Data that is a signature's strict prefix and
// then pauses, "P" or "PROX" here, waits for PreludeTimeout: only more
// bytes can tell it from a header.)
func TestOptionalWithoutHeader(t *testing.T) { forDrivers(t, testOptionalWithoutHeader) }

func testOptionalWithoutHeader(t *testing.T, d driver) {
	s := startServer(t, d, proxy.Optional, sockfsm.Config{PreludeTimeout: 200 * time.Millisecond})
	for _, msg := range []string{"this is a test", "PING", "PROX", "\r\nnot v2", "P"} {
		c := dial(t, s.addr)
		tutorial(t, c, nil, msg)
		if got, want := s.lastInfo(t).RemoteAddr.String(), c.LocalAddr().String(); got != want {
			t.Errorf("%q: RemoteAddr %s, want the peer's %s", msg, got, want)
		}
	}
	if r := s.refusals(); len(r) != 0 {
		t.Errorf("refusals: %v", r)
	}
}

// TestMaxConnsPerIPUsesHeader: the per-address limit counts the header's
// client address, not the proxy's, and releases it when the connection
// closes.
func TestMaxConnsPerIPUsesHeader(t *testing.T) { forDrivers(t, testMaxConnsPerIPUsesHeader) }

func testMaxConnsPerIPUsesHeader(t *testing.T, d driver) {
	s := startServer(t, d, proxy.Required, sockfsm.Config{MaxConnsPerIP: 1})
	a := dial(t, s.addr)
	if _, err := a.Write(append(header(t, 2, "203.0.113.50:1000", "198.51.100.1:80"), "a"...)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(a, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	b := dial(t, s.addr) // the same client, by the header
	if _, err := b.Write(header(t, 1, "203.0.113.50:1001", "198.51.100.1:80")); err != nil {
		t.Fatal(err)
	}
	if n, _ := io.Copy(io.Discard, b); n != 0 {
		t.Errorf("the second connection of 203.0.113.50 got %d bytes", n)
	}
	c := dial(t, s.addr) // another client through the same proxy
	tutorial(t, c, header(t, 2, "203.0.113.51:1000", "198.51.100.1:80"), "served")
	r := s.waitRefusals(t, 1)
	if len(r) != 1 || !errors.Is(r[0].reason, sockfsm.ErrTooManyConnsFromIP) || r[0].remote.String() != "203.0.113.50:1001" {
		t.Errorf("refusals %v, want one, ErrTooManyConnsFromIP from 203.0.113.50:1001", r)
	}
	tutorial(t, a, nil, "first")
	for end := time.Now().Add(deadline); time.Now().Before(end) && s.srv.NumConns() != 0; {
		time.Sleep(time.Millisecond)
	}
	again := dial(t, s.addr) // 203.0.113.50 again, its first connection closed
	tutorial(t, again, header(t, 1, "203.0.113.50:1002", "198.51.100.1:80"), "again")
	if r := s.refusals(); len(r) != 1 {
		t.Errorf("refusals %v, want only the first one", r)
	}
}

func TestParseMode(t *testing.T) {
	for _, m := range []proxy.Mode{proxy.Off, proxy.Required, proxy.Optional} {
		got, err := proxy.ParseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	if _, err := proxy.ParseMode("yes"); err == nil {
		t.Error(`ParseMode("yes") succeeded`)
	}
	if proxy.Prelude(proxy.Off) != nil {
		t.Error("Prelude(Off) is not nil")
	}
}
