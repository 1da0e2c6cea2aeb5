package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/nettest"
)

// forEachLoopback runs f on 127.0.0.1 and, where available, on ::1.
func forEachLoopback(t *testing.T, f func(t *testing.T, host string)) {
	t.Run("IPv4", func(t *testing.T) { f(t, "127.0.0.1") })
	t.Run("IPv6", func(t *testing.T) {
		if !nettest.SupportsIPv6() {
			t.Skip("IPv6 is not available")
		}
		f(t, "::1")
	})
}

// tcpPair returns the two ends of a loopback TCP connection on host. Both
// are guarded and closed when the test ends.
func tcpPair(t *testing.T, host string) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer ln.Close()
	return connPair[*net.TCPConn](t, ln)
}

// unixPair returns the two ends of a Unix stream connection, like tcpPair.
func unixPair(t *testing.T) (client, server *net.UnixConn) {
	t.Helper()
	if !nettest.TestableNetwork("unix") {
		t.Skip("Unix sockets are not available")
	}
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer ln.Close()
	return connPair[*net.UnixConn](t, ln)
}

func connPair[C net.Conn](t *testing.T, ln net.Listener) (client, server C) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept() // fails, ending this goroutine, if ln closes first
		accepted <- c
	}()
	cc, err := net.Dial(ln.Addr().Network(), ln.Addr().String())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { cc.Close() })
	sc := <-accepted
	if sc == nil {
		t.Fatal("Accept failed")
	}
	t.Cleanup(func() { sc.Close() })
	guard(t, cc, sc)
	return cc.(C), sc.(C)
}

func TestTCPCloseWrite(t *testing.T) {
	forEachLoopback(t, func(t *testing.T, host string) {
		client, server := tcpPair(t, host)
		c := TCP(client)

		mustWrite(t, c, "request")
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		if got := readAll(t, server); got != "request" {
			t.Fatalf("peer read %q, want %q", got, "request")
		}
		mustWrite(t, server, "response")
		if err := server.CloseWrite(); err != nil {
			t.Fatalf("peer CloseWrite: %v", err)
		}
		if got := readAll(t, c); got != "response" {
			t.Fatalf("read %q, want %q", got, "response")
		}
	})
}

func TestTCPAbort(t *testing.T) {
	forEachLoopback(t, func(t *testing.T, host string) {
		client, server := tcpPair(t, host)
		c, err := Wrap(client)
		if err != nil {
			t.Fatalf("Wrap: %v", err)
		}

		mustWrite(t, c, "hello")
		if _, err := server.Read(make([]byte, 5)); err != nil {
			t.Fatalf("peer Read: %v", err)
		}
		if err := c.Abort(); err != nil {
			t.Fatalf("Abort: %v", err)
		}
		_, err = server.Read(make([]byte, 1))
		wantIs(t, "peer Read", err, syscall.ECONNRESET)
		wantIs(t, "Close after Abort", c.Close(), net.ErrClosed)
	})
}

func TestUnixCloseWrite(t *testing.T) {
	client, server := unixPair(t)
	c := Unix(client)

	mustWrite(t, c, "request")
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	if got := readAll(t, server); got != "request" {
		t.Fatalf("peer read %q, want %q", got, "request")
	}
	mustWrite(t, server, "response")
	if err := server.Close(); err != nil {
		t.Fatalf("peer Close: %v", err)
	}
	if got := readAll(t, c); got != "response" {
		t.Fatalf("read %q, want %q", got, "response")
	}
	if err := c.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
}

// tlsConfigs returns a server config with a fresh self-signed certificate
// for the loopback addresses and a client config that trusts it.
func tlsConfigs(t *testing.T, host string) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "sockfsm transport test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}}}
	client = &tls.Config{RootCAs: roots, ServerName: host}
	return server, client
}

// tlsPair returns the two ends of a loopback TLS connection on host after
// the handshake, and the client's underlying TCP connection.
func tlsPair(t *testing.T, host string) (client *tls.Conn, clientRaw *net.TCPConn, server *tls.Conn) {
	t.Helper()
	clientRaw, serverRaw := tcpPair(t, host)
	scfg, ccfg := tlsConfigs(t, host)
	client = tls.Client(clientRaw, ccfg)
	server = tls.Server(serverRaw, scfg)
	done := make(chan error, 1)
	go func() { done <- client.Handshake() }()
	serr := server.Handshake()
	if cerr := <-done; serr != nil || cerr != nil {
		t.Fatalf("handshake: server %v, client %v", serr, cerr)
	}
	return client, clientRaw, server
}

func TestTLSCloseWrite(t *testing.T) {
	forEachLoopback(t, func(t *testing.T, host string) {
		client, clientRaw, server := tlsPair(t, host)
		s := TLS(server)

		mustWrite(t, s, "from server")
		if err := s.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		// close_notify: the client's TLS stream ends with io.EOF.
		if got := readAll(t, client); got != "from server" {
			t.Fatalf("client read %q, want %q", got, "from server")
		}
		wantEOF(t, client)
		// FIN: the TCP stream under it ends too. crypto/tls stops reading
		// the raw connection at close_notify, so the FIN is still unread.
		wantEOF(t, clientRaw)

		// The client can still send; its own CloseWrite ends the stream.
		c := TLS(client)
		mustWrite(t, c, "from client")
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("client CloseWrite: %v", err)
		}
		if got := readAll(t, s); got != "from client" {
			t.Fatalf("server read %q, want %q", got, "from client")
		}
	})
}

func TestTLSAbort(t *testing.T) {
	forEachLoopback(t, func(t *testing.T, host string) {
		client, _, server := tlsPair(t, host)
		if err := TLS(client).Abort(); err != nil {
			t.Fatalf("Abort: %v", err)
		}
		_, err := server.Read(make([]byte, 1))
		wantIs(t, "peer Read", err, syscall.ECONNRESET)
	})
}

func TestWrap(t *testing.T) {
	a, b := Pipe()
	defer a.Close()
	defer b.Close()
	if got, err := Wrap(a); err != nil || got != a {
		t.Errorf("Wrap(pipe end) = %v, %v; want the same end", got, err)
	}

	tc, _ := tcpPair(t, "127.0.0.1")
	uc, _ := unixPair(t)
	for _, tt := range []struct {
		name string
		c    net.Conn
		ok   func(Stream) bool
	}{
		{"TCP", tc, func(c Stream) bool { w, ok := c.(*tcpConn); return ok && w.TCPConn == tc }},
		{"Unix", uc, func(c Stream) bool { w, ok := c.(*unixConn); return ok && w.UnixConn == uc }},
		{"TLS", tls.Client(tc, &tls.Config{}), func(c Stream) bool { _, ok := c.(tlsConn); return ok }},
	} {
		got, err := Wrap(tt.c)
		if err != nil || !tt.ok(got) {
			t.Errorf("Wrap(%s) = %#v, %v", tt.name, got, err)
			continue
		}
		if again, err := Wrap(got); err != nil || again != got {
			t.Errorf("Wrap(Wrap(%s)) = %#v, %v; want the same Stream", tt.name, again, err)
		}
	}

	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	got, err := Wrap(p1)
	wantIs(t, "Wrap(net.Pipe end)", err, ErrUnsupported)
	if got != nil || !strings.Contains(err.Error(), "*net.pipe") {
		t.Errorf("Wrap(net.Pipe end) = %v, %v; want nil and an error naming the type", got, err)
	}
}
