package main

// Tests of the listeners of listen.go, in process through run: the
// tutorial over a Unix socket (a stale socket file replaced, a live one or
// a file that is not a socket refused, the file gone after shutdown) and
// over TLS (close_notify, then FIN).

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// deployFlagCases are the flags of listen.go and upgrade.go, for
// TestFlagsReachServer.
func deployFlagCases() []flagCase {
	opt := func(f func(deployOptions) any) func(options, *sockfsm.Server) any {
		return func(o options, _ *sockfsm.Server) any { return f(o.deployOptions) }
	}
	return []flagCase{
		{"tls-cert", "cert.pem", "cert.pem", opt(func(o deployOptions) any { return o.tlsCert })},
		{"tls-key", "key.pem", "key.pem", opt(func(o deployOptions) any { return o.tlsKey })},
		{"upgrade", "true", true, opt(func(o deployOptions) any { return o.upgrade })},
		{"pid-file", "server.pid", "server.pid", opt(func(o deployOptions) any { return o.pidFile })},
	}
}

// running is a run in process, serving.
type running struct {
	t      *testing.T
	addr   net.Addr
	stderr *syncBuffer
	sigs   chan os.Signal
	done   chan int
}

// startRun runs run(args) until it listens.
func startRun(t *testing.T, args ...string) *running {
	t.Helper()
	r := &running{t: t, stderr: &syncBuffer{}, sigs: make(chan os.Signal, 1), done: make(chan int, 1)}
	ready := make(chan net.Addr, 1)
	go func() { r.done <- run(args, io.Discard, r.stderr, r.sigs, ready) }()
	select {
	case r.addr = <-ready:
	case code := <-r.done:
		t.Fatalf("run(%q) returned %d before listening; stderr:\n%s", args, code, r.stderr.String())
	case <-time.After(deadline):
		t.Fatalf("run(%q) did not start", args)
	}
	t.Cleanup(func() { r.stop() })
	return r
}

// stop sends SIGTERM, once, and returns run's exit code.
func (r *running) stop() int {
	r.t.Helper()
	if r.sigs == nil {
		return 0
	}
	r.sigs <- syscall.SIGTERM
	r.sigs = nil
	select {
	case code := <-r.done:
		return code
	case <-time.After(deadline):
		r.t.Fatal("run did not return after SIGTERM")
		return -1
	}
}

// exchangeOn is the tutorial's client on a connection: send msg,
// half-close, read to EOF.
func exchangeOn(c net.Conn, msg []byte) ([]byte, error) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// staleSocket leaves a socket file at path that nobody listens on, as a
// server that was killed does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("no stale socket at %s: %v", path, err)
	}
}

// TestUnixSocket: -addr unix:PATH serves the tutorial on a Unix socket; a
// stale socket file at PATH is replaced; a second server on the same PATH
// is refused while the first one answers there, and so is a PATH that is
// not a socket; the socket file is gone after the shutdown.
func TestUnixSocket(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("Unix sockets: tested on Unix systems")
	}
	// Socket paths are short (108 bytes on Linux): t.TempDir's may be long.
	dir, err := os.MkdirTemp("", "sockfsm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "echo.sock")
	staleSocket(t, path)

	r := startRun(t, "-addr", "unix:"+path)
	if r.addr.Network() != "unix" || r.addr.String() != path {
		t.Fatalf("listening on %s %s, want unix %s", r.addr.Network(), r.addr, path)
	}
	msg := "this is a test"
	c, err := net.DialTimeout("unix", path, deadline)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := exchangeOn(c, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("exchange over the Unix socket: %q, %v; want %q then EOF", got, err, msg)
	}

	code, _, stderr := runResult(t, "-addr", "unix:"+path)
	if code != 1 || !strings.Contains(stderr, "a server is listening there") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("a second server on the live socket: %d, stderr %q; want 1 and a one-line error", code, stderr)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("the refused server touched the live socket file: %v", err)
	}
	// The live server still serves.
	c, err = net.DialTimeout("unix", path, deadline)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := exchangeOn(c, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("exchange after the refused server: %q, %v; want %q then EOF", got, err, msg)
	}

	if code := r.stop(); code != 0 {
		t.Errorf("run returned %d after SIGTERM, want 0; stderr:\n%s", code, r.stderr.String())
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the socket file is still there after the shutdown: %v", err)
	}

	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runResult(t, "-addr", "unix:"+notSocket)
	if code != 1 || !strings.Contains(stderr, "is not a socket") {
		t.Errorf("-addr on a regular file: %d, stderr %q; want 1 and %q", code, stderr, "is not a socket")
	}
	if b, err := os.ReadFile(notSocket); err != nil || string(b) != "data" {
		t.Errorf("the regular file was touched: %q, %v", b, err)
	}
	code, _, stderr = runResult(t, "-addr", "unix:")
	if code != 1 || !strings.Contains(stderr, "needs a path") {
		t.Errorf("-addr unix: %d, stderr %q; want 1 and %q", code, stderr, "needs a path")
	}
}

// writeCert writes a fresh self-signed certificate for 127.0.0.1 and its
// key to dir, as PEM, and returns their paths and a pool that trusts it.
func writeCert(t *testing.T, dir string) (certFile, keyFile string, roots *x509.CertPool) {
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
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, roots
}

// TestTLS: with -tls-cert and -tls-key the server speaks TLS; the tutorial
// runs over it (our close_notify is the half-close), and the server ends
// with its close_notify and then a FIN: the TLS stream ends cleanly (EOF,
// not an unexpected EOF) and the TCP stream under it ends too. A missing
// half of the pair, or files that are not a certificate, fail at once.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, roots := writeCert(t, dir)
	r := startRun(t, "-addr", "127.0.0.1:0", "-tls-cert", certFile, "-tls-key", keyFile)

	for i := range 3 {
		raw, err := net.DialTimeout("tcp", r.addr.String(), deadline)
		if err != nil {
			t.Fatal(err)
		}
		c := tls.Client(raw, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
		c.SetDeadline(time.Now().Add(deadline))
		msg := strings.Repeat("this is a test ", 1+i*1000)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil { // close_notify
			t.Fatal(err)
		}
		got, err := io.ReadAll(c) // ends at the server's close_notify: nil error
		if err != nil || string(got) != msg {
			t.Errorf("exchange %d over TLS: %d bytes, %v; want the %d bytes echoed, then close_notify", i, len(got), err, len(msg))
		}
		// After close_notify, the FIN: the raw stream ends.
		if n, err := raw.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("exchange %d: after close_notify the TCP stream gave %d bytes, %v; want EOF (the server's FIN)", i, n, err)
		}
		raw.Close()
	}
	if code := r.stop(); code != 0 {
		t.Errorf("run returned %d, want 0; stderr:\n%s", code, r.stderr.String())
	}
	if !strings.Contains(r.stderr.String(), "msg=\"serving TLS\"") {
		t.Errorf("the log does not say it serves TLS:\n%s", r.stderr.String())
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-tls-cert", certFile}, "-tls-cert and -tls-key go together"},
		{[]string{"-tls-key", keyFile}, "-tls-cert and -tls-key go together"},
		{[]string{"-tls-cert", keyFile, "-tls-key", certFile}, "-tls-cert, -tls-key:"},
		{[]string{"-tls-cert", filepath.Join(dir, "none"), "-tls-key", keyFile}, "no such file"},
	} {
		code, _, stderr := runResult(t, append([]string{"-addr", "127.0.0.1:0"}, tc.args...)...)
		if code != 1 || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("run(%q) = %d, stderr %q; want 1 and a one-line error with %q", tc.args, code, stderr, tc.want)
		}
	}
}

// TestPIDFile: without -upgrade, -pid-file names this process while it
// serves, and is removed when it stops; a pid file that cannot be written
// fails at once.
func TestPIDFile(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "server.pid")
	r := startRun(t, "-addr", "127.0.0.1:0", "-pid-file", pidFile)
	if b, err := os.ReadFile(pidFile); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Errorf("the pid file has %q, %v; want %d", b, err, os.Getpid())
	}
	if code := r.stop(); code != 0 {
		t.Errorf("run returned %d, want 0", code)
	}
	if _, err := os.Stat(pidFile); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the pid file is still there after the shutdown: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("files left in the pid file's directory: %v", entries)
	}

	code, _, stderr := runResult(t, "-addr", "127.0.0.1:0", "-pid-file", filepath.Join(dir, "none", "server.pid"))
	if code != 1 || !strings.Contains(stderr, "-pid-file") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("an unwritable pid file: %d, stderr %q; want 1 and a one-line error", code, stderr)
	}
}
