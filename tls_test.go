package sockfsm_test

// The engine over TLS on 127.0.0.1: the tutorial flow ends with close_notify
// and a real FIN, and a client that never finishes its handshake is bounded
// by the idle timeout.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// greeter echoes and greets, and reports how its connection ended.
type greeter struct {
	greet  bool
	closed chan sockfsm.CloseInfo
}

func (g *greeter) OnOpen(c *sockfsm.Conn) {
	if g.greet {
		c.Write([]byte("hello\n"))
	}
}
func (g *greeter) OnData(c *sockfsm.Conn, p []byte)                { c.Write(p) }
func (g *greeter) OnClose(_ *sockfsm.Conn, info sockfsm.CloseInfo) { g.closed <- info }

func startTLS(t *testing.T, cfg sockfsm.Config, greet bool) (addr string, closed chan sockfsm.CloseInfo) {
	t.Helper()
	checkFDs(t)
	closed = make(chan sockfsm.CloseInfo, 16)
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := &sockfsm.Server{Config: cfg, NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler {
		return &greeter{greet: greet, closed: closed}
	}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tln := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(tln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln.Addr().String(), closed
}

func waitInfo(t *testing.T, closed chan sockfsm.CloseInfo) sockfsm.CloseInfo {
	t.Helper()
	select {
	case info := <-closed:
		return info
	case <-time.After(10 * time.Second):
		t.Fatal("the server never closed the connection")
		return sockfsm.CloseInfo{}
	}
}

// TestTLSTutorialFlow: over TLS the client's close_notify is the peer's
// FIN; the server answers, sends close_notify and a real TCP FIN, and the
// client reads every byte, then EOF.
func TestTLSTutorialFlow(t *testing.T) {
	addr, closed := startTLS(t, sockfsm.Config{IdleTimeout: 5 * time.Second}, false)
	raw, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
	msg := []byte("this is a test")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil { // close_notify
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != string(msg) {
		t.Fatalf("read %q, %v; want %q then EOF", got, err, msg)
	}
	// After close_notify the TCP stream itself ends with FIN, not RST.
	if n, err := raw.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("raw read after close_notify: %d, %v; want the server's FIN", n, err)
	}
	info := waitInfo(t, closed)
	if info.Reason != sockfsm.ReasonPeerClosed || info.Aborted() || info.BytesWritten != int64(len(msg)) {
		t.Fatalf("info %+v", info)
	}
}

// TestTLSHandshakeTimeout: a client that connects and never sends its
// ClientHello is closed after IdleTimeout, although the handler's first
// operation is a write (a greeting), which has no read deadline of its own.
func TestTLSHandshakeTimeout(t *testing.T) {
	addr, closed := startTLS(t, sockfsm.Config{IdleTimeout: 200 * time.Millisecond}, true)
	raw, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	info := waitInfo(t, closed)
	if info.Reason != sockfsm.ReasonHandshake || !errors.Is(info.Err, sockfsm.ErrHandshake) {
		t.Fatalf("info %+v", info)
	}
	raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := raw.Read(make([]byte, 1)); err == nil {
		t.Fatal("the server's end is still open")
	}
}

// TestTLSShutdownDuringHandshake: a connection still in its TLS handshake
// when the server shuts down has read and written nothing: it is closed
// gracefully (no RST), and Shutdown returns nil.
func TestTLSShutdownDuringHandshake(t *testing.T) {
	checkFDs(t)
	closed := make(chan sockfsm.CloseInfo, 1)
	opened := make(chan struct{}, 1)
	srv := &sockfsm.Server{
		Config: sockfsm.Config{IdleTimeout: time.Minute, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			OnClose: func(_ sockfsm.ConnInfo, info sockfsm.CloseInfo) { closed <- info }},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler {
			opened <- struct{}{}
			return sockfsm.Echo{}
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}))
	}()
	raw, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	<-opened // the server has the connection; the client sends no ClientHello
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if info := waitInfo(t, closed); info.Reason != sockfsm.ReasonShutdown || info.Aborted() {
		t.Fatalf("info %+v, want a graceful shutdown", info)
	}
	raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := raw.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read: %v, want EOF (FIN, not RST)", err)
	}
	if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}
