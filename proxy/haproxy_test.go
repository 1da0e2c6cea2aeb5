package proxy_test

// A real HAProxy in front of a sockfsm server: HAProxy's own send-proxy
// (v1) and send-proxy-v2 headers, its FIN handling in mode tcp, and a
// direct connection without a header refused. Skipped when haproxy is not
// installed (Debian: apt-get install haproxy).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"github.com/sockfsm/sockfsm/proxy"
)

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startHAProxy runs haproxy in the foreground with two TCP frontends that
// forward to backend: the first with send-proxy-v2, the second with
// send-proxy (v1). It returns their addresses; haproxy is killed when the
// test ends.
func startHAProxy(t *testing.T, backend string) (v2, v1 string) {
	t.Helper()
	bin := testutil.Tool(t, "haproxy", "haproxy")
	p2, p1 := freePort(t), freePort(t)
	v2, v1 = fmt.Sprintf("127.0.0.1:%d", p2), fmt.Sprintf("127.0.0.1:%d", p1)
	cfg := fmt.Sprintf(`global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe_v2
    bind %s
    default_backend be_v2
backend be_v2
    server sockfsm %s send-proxy-v2
frontend fe_v1
    bind %s
    default_backend be_v1
backend be_v1
    server sockfsm %s send-proxy
`, v2, backend, v1, backend)
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "-db", "-f", path)
	out := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting haproxy: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel() // kills it
		select {
		case <-exited:
		case <-time.After(deadline):
			t.Error("haproxy did not exit after kill")
		}
		if t.Failed() {
			t.Logf("haproxy output:\n%s", out.String())
		}
	})
	// Wait, bounded, until both frontends listen. A probe connection
	// reaches the backend through haproxy, as a connection from 127.0.0.1.
	end := time.Now().Add(deadline)
	for _, addr := range []string{v2, v1} {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case err := <-exited:
				t.Fatalf("haproxy exited: %v\n%s", err, out.String())
			default:
			}
			if time.Now().After(end) {
				t.Fatalf("haproxy does not listen on %s: %v\n%s", addr, err, out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return v2, v1
}

func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: deadline}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("Dial %s from %s: %v", addr, src, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(deadline))
	return c
}

// infoFor waits (bounded) for the ConnInfo of the connection whose client
// address, by its PROXY header, is client.
func (s *server) infoFor(t *testing.T, client string) (sockfsm.ConnInfo, bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for time.Now().Before(end) {
		s.mu.Lock()
		for _, ci := range s.infos {
			if ci.RemoteAddr.String() == client {
				s.mu.Unlock()
				return ci, true
			}
		}
		s.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	return sockfsm.ConnInfo{}, false
}

func TestBehindHAProxy(t *testing.T) { forDrivers(t, testBehindHAProxy) }

func testBehindHAProxy(t *testing.T, d driver) {
	testutil.Tool(t, "haproxy", "haproxy")
	s := startServer(t, d, proxy.Required, sockfsm.Config{MaxConnsPerIP: 1})
	v2, v1 := startHAProxy(t, s.addr)

	for _, fe := range []struct{ name, addr, src string }{{"send-proxy-v2", v2, "127.0.0.5"}, {"send-proxy", v1, "127.0.0.6"}} {
		t.Run(fe.name, func(t *testing.T) {
			// The tutorial's flow through HAProxy: send, half-close, the
			// echo, the server's FIN carried back by HAProxy.
			c := dialFrom(t, fe.src, fe.addr)
			tutorial(t, c, nil, "this is a test")
			ci, ok := s.infoFor(t, c.LocalAddr().String())
			if !ok {
				t.Fatalf("no connection served with RemoteAddr %s (the client's address); served: %v", c.LocalAddr(), s.remotes())
			}
			if ci.LocalAddr.String() != fe.addr {
				t.Errorf("LocalAddr %s, want the frontend the client connected to, %s", ci.LocalAddr, fe.addr)
			}
		})
	}

	t.Run("MaxConnsPerIP by the header's address", func(t *testing.T) {
		before := len(s.refusals())
		held := dialFrom(t, "127.0.0.7", v2)
		if _, err := held.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(held, make([]byte, 1)); err != nil {
			t.Fatalf("the first connection from 127.0.0.7: %v", err)
		}
		over := dialFrom(t, "127.0.0.7", v2)
		over.Write([]byte("y"))
		if n, _ := io.Copy(io.Discard, over); n != 0 {
			t.Errorf("the second connection from 127.0.0.7 got %d bytes: it was served", n)
		}
		other := dialFrom(t, "127.0.0.8", v1)
		tutorial(t, other, nil, "unaffected")
		// Only the refusals of the header's address count: HAProxy may make
		// connections of its own (a LOCAL header keeps HAProxy's own
		// address, 127.0.0.1), which the limit of 1 refuses beside ours.
		fromClient := func() (r []refusal) {
			for _, f := range s.refusals()[before:] {
				if host, _, _ := net.SplitHostPort(f.remote.String()); host == "127.0.0.7" {
					r = append(r, f)
				}
			}
			return r
		}
		for end := time.Now().Add(deadline); len(fromClient()) == 0 && time.Now().Before(end); {
			time.Sleep(time.Millisecond)
		}
		r := fromClient()
		if len(r) != 1 || !errors.Is(r[0].reason, sockfsm.ErrTooManyConnsFromIP) || r[0].remote.String() != over.LocalAddr().String() {
			t.Errorf("refusals from 127.0.0.7 %v, want one: ErrTooManyConnsFromIP from %s", r, over.LocalAddr())
		}
		tutorial(t, held, nil, "still served")
	})

	t.Run("direct without header", func(t *testing.T) {
		before := len(s.refusals())
		c := dialFrom(t, "127.0.0.9", s.addr)
		c.Write([]byte("this is a test"))
		if n, _ := io.Copy(io.Discard, c); n != 0 {
			t.Errorf("a direct connection got %d bytes: it was served", n)
		}
		r := s.waitRefusals(t, before+1)[before:]
		if len(r) != 1 || !errors.Is(r[0].reason, sockfsm.ErrProxyHeader) || r[0].remote.String() != c.LocalAddr().String() {
			t.Errorf("refusals %v, want one: ErrProxyHeader from %s", r, c.LocalAddr())
		}
		if !strings.Contains(s.logs.String(), "remote="+c.LocalAddr().String()) {
			t.Errorf("the refusal of %s is not logged:\n%s", c.LocalAddr(), s.logs.String())
		}
	})
}

// remotes lists the RemoteAddr of every connection served.
func (s *server) remotes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var r []string
	for _, ci := range s.infos {
		r = append(r, ci.RemoteAddr.String())
	}
	return r
}
