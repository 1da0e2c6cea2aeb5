package loop

// Config.Prelude on the loop (prelude_linux.go). The PROXY protocol itself
// runs on both drivers in package proxy's tests; these check what is the
// loop's own: the socket is served, not the connection the prelude
// returned; wrappers it cannot see through are refused; a prelude holds
// its MaxConns slot and gives it back; Shutdown cuts preludes short.

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// hdr is the test prelude's header: four bytes, read exactly.
const hdr = "HDR:"

// readdressed is a sockfsm.Readdressed with a client address of
// 203.0.113.7, a port each.
type readdressed struct {
	net.Conn
	base net.Conn
	port int
}

var ports atomic.Int32

func (r readdressed) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(203, 0, 113, 7), Port: r.port}
}
func (r readdressed) Readdressed() net.Conn { return r.base }

// headerPrelude reads hdr exactly and returns c readdressed, or c itself
// if bare.
func headerPrelude(bare bool) func(net.Conn) (net.Conn, error) {
	return func(c net.Conn) (net.Conn, error) {
		b := make([]byte, len(hdr))
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, err
		}
		if string(b) != hdr {
			return nil, errors.New("no header")
		}
		if bare {
			return c, nil
		}
		return readdressed{Conn: c, base: c, port: int(ports.Add(1))}, nil
	}
}

// refusals records OnRefuse.
type refusals struct {
	mu  sync.Mutex
	got []error
}

func (r *refusals) on(_ net.Addr, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, err)
}

func (r *refusals) list() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.got...)
}

// TestPreludeServesTheSocket: the bytes that came with the header in one
// segment, and the peer's FIN, reach the handler on the loop: the tutorial's
// exchange is whole, on TCP and on a Unix socket, with the address of the
// connection the prelude returned (the connection itself, a Readdressed
// of it, or a Readdressed of that: a prelude that wraps another's).
func TestPreludeServesTheSocket(t *testing.T) {
	checkFDs(t)
	for _, tc := range []struct {
		network     string
		bare, twice bool
	}{{"tcp", false, false}, {"tcp", true, false}, {"unix", false, false}, {"tcp", false, true}} {
		name := tc.network + map[bool]string{true: " bare", false: " readdressed"}[tc.bare] + map[bool]string{true: " twice"}[tc.twice]
		prelude := headerPrelude(tc.bare)
		if tc.twice {
			inner := prelude
			prelude = func(c net.Conn) (net.Conn, error) {
				nc, err := inner(c)
				if err != nil {
					return nil, err
				}
				return readdressed{Conn: nc, base: nc, port: int(ports.Add(1))}, nil
			}
		}
		t.Run(name, func(t *testing.T) {
			addr := "127.0.0.1:0"
			if tc.network == "unix" {
				addr = filepath.Join(t.TempDir(), "s")
			}
			infos := make(chan sockfsm.ConnInfo, 4)
			ts := startServer(t, tc.network, addr, 2, sockfsm.Config{Prelude: prelude}, func(ci sockfsm.ConnInfo) sockfsm.Handler {
				infos <- ci
				return sockfsm.Echo{}
			})
			for range 3 {
				c := ts.dial(t)
				const msg = "this is a test"
				conntest.MustWrite(t, c, []byte(hdr+msg))
				conntest.CloseWrite(t, c)
				if got := conntest.ReadToEOF(t, c); string(got) != msg {
					t.Fatalf("client received %q, want %q", got, msg)
				}
				ci := conntest.Recv(t, "the connection's ConnInfo", infos)
				info := ts.rec.wait(t, conntest.AddrKey(ci.RemoteAddr))
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true,
					BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})
				want := c.LocalAddr().String()
				if tc.network == "tcp" && tc.bare && ci.RemoteAddr.String() != want {
					t.Errorf("RemoteAddr %v, want the peer's %s", ci.RemoteAddr, want)
				}
				if a, ok := ci.RemoteAddr.(*net.TCPAddr); !tc.bare && (!ok || !a.IP.Equal(net.IPv4(203, 0, 113, 7))) {
					t.Errorf("RemoteAddr %v, want the prelude's 203.0.113.7", ci.RemoteAddr)
				}
			}
		})
	}
}

// TestPreludeRefusals: a prelude that fails, panics, or returns a wrapper
// the loop cannot see through (its socket is served, not the wrapper) has
// its connection closed unserved and refused once with ErrPrelude; the
// loop serves the next connection.
func TestPreludeRefusals(t *testing.T) {
	checkFDs(t)
	var other net.Conn = &net.TCPConn{}
	for _, tc := range []struct {
		name    string
		prelude func(net.Conn) (net.Conn, error)
		want    string
	}{
		{"wrapper", func(c net.Conn) (net.Conn, error) { return struct{ net.Conn }{c}, nil }, "Readdressed"},
		{"another base", func(c net.Conn) (net.Conn, error) { return readdressed{Conn: c, base: other, port: 1}, nil }, "Readdressed"},
		{"panic", func(net.Conn) (net.Conn, error) { panic("kaboom") }, "kaboom"},
		{"error", func(net.Conn) (net.Conn, error) { return nil, errors.New("bad") }, "bad"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r refusals
			good := headerPrelude(false)
			ts := startServer(t, "tcp", "127.0.0.1:0", 1, sockfsm.Config{OnRefuse: r.on, Prelude: func(c net.Conn) (net.Conn, error) {
				b := make([]byte, 1)
				if _, err := io.ReadFull(c, b); err != nil || b[0] != '!' {
					return good(c)
				}
				return tc.prelude(c)
			}}, conntest.Always(sockfsm.Echo{}))
			bad := ts.dial(t)
			conntest.MustWrite(t, bad, []byte("!this is a test"))
			if n, err := io.Copy(io.Discard, bad); n != 0 || (err != nil && !conntest.IsReset(err)) {
				t.Errorf("the refused client read %d bytes, %v; want the server's close and nothing else", n, err)
			}
			conntest.WaitUntil(t, "the refusal", func() bool { return len(r.list()) > 0 })
			got := r.list()
			if len(got) != 1 || !errors.Is(got[0], sockfsm.ErrPrelude) || !strings.Contains(got[0].Error(), tc.want) {
				t.Errorf("refusals %v, want one matching ErrPrelude that says %q", got, tc.want)
			}
			c := ts.dial(t)
			conntest.MustWrite(t, c, []byte("#"+hdr+"served"))
			conntest.CloseWrite(t, c)
			if got := conntest.ReadToEOF(t, c); string(got) != "served" {
				t.Fatalf("the next client received %q", got)
			}
		})
	}
}

// TestPreludeHoldsItsSlot: a connection in its prelude holds its MaxConns
// slot, and gives it back when the prelude fails: a listener paused at
// MaxConns behind a silent peer resumes at its PreludeTimeout and serves
// the connection that waited.
func TestPreludeHoldsItsSlot(t *testing.T) {
	checkFDs(t)
	var r refusals
	ts := startServer(t, "tcp", "127.0.0.1:0", 1, sockfsm.Config{MaxConns: 1, PreludeTimeout: 200 * time.Millisecond, OnRefuse: r.on,
		Prelude: headerPrelude(false)}, conntest.Always(sockfsm.Echo{}))
	silent := ts.dial(t)
	c := ts.dial(t) // in the backlog until the silent one's slot is free
	conntest.MustWrite(t, c, []byte(hdr+"waited"))
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); string(got) != "waited" {
		t.Fatalf("the waiting client received %q", got)
	}
	if n, _ := io.Copy(io.Discard, silent); n != 0 {
		t.Errorf("the silent client read %d bytes", n)
	}
	if got := r.list(); len(got) != 1 || !errors.Is(got[0], sockfsm.ErrPrelude) {
		t.Errorf("refusals %v, want the silent one's, at its PreludeTimeout", got)
	}
}

// TestShutdownCutsPreludes: Shutdown does not wait for a peer that never
// sends its header (PreludeTimeout is an hour): it cuts the prelude short,
// closes the connection without refusing it, and returns nil.
func TestShutdownCutsPreludes(t *testing.T) {
	checkFDs(t)
	var r refusals
	started := make(chan struct{}, 1)
	prelude := headerPrelude(false)
	srv := &Server{NewHandler: conntest.Always(sockfsm.Echo{}), Loops: 1, Config: sockfsm.Config{
		PreludeTimeout: time.Hour, OnRefuse: r.on, Logger: testLogger(t),
		Prelude: func(c net.Conn) (net.Conn, error) {
			started <- struct{}{}
			return prelude(c)
		},
	}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), clientDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(clientDeadline))
	conntest.Recv(t, "the prelude's start", started)
	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(ctx) }()
	if err := conntest.Recv(t, "Shutdown's return, with a peer in its prelude", shut); err != nil {
		t.Errorf("Shutdown = %v, want nil: it waited for the prelude", err)
	}
	if err := conntest.Recv(t, "Serve's return", served); !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Errorf("Serve = %v", err)
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || (err != nil && !conntest.IsReset(err)) {
		t.Errorf("the client read %d bytes, %v; want the server's close", n, err)
	}
	if got := r.list(); len(got) != 0 {
		t.Errorf("refusals %v, want none: a prelude cut short by Shutdown is not refused", got)
	}
}

// TestPreludeNewHandlerFails: a connection whose NewHandler fails after
// its prelude is aborted (RST), and gives back its MaxConns slot and its
// MaxConnsPerIP count: the next connection from the same address is
// served.
func TestPreludeNewHandlerFails(t *testing.T) {
	checkFDs(t)
	var n atomic.Int32
	ts := startServer(t, "tcp", "127.0.0.1:0", 1, sockfsm.Config{MaxConns: 1, MaxConnsPerIP: 1, Prelude: headerPrelude(true)},
		func(sockfsm.ConnInfo) sockfsm.Handler {
			if n.Add(1) == 1 {
				return nil // ErrNoHandler
			}
			return sockfsm.Echo{}
		})
	c := ts.dial(t)
	conntest.MustWrite(t, c, []byte(hdr+"first"))
	conntest.WantReset(t, c, nil)
	c = ts.dial(t)
	conntest.MustWrite(t, c, []byte(hdr+"second"))
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); string(got) != "second" {
		t.Fatalf("the second client received %q", got)
	}
}
