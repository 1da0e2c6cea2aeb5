//go:build unix

package sockfsm_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
)

// net/http on the Listener, over real sockets on loopback.

const (
	// htBody is the request body the client uploads: more than the 256 KiB
	// net/http drains itself after a handler that did not read the body
	// (maxPostHandlerReadBytes), so net/http answers, half-closes, waits
	// 500 ms (rstAvoidanceDelay) and closes with the rest unread.
	htBody = 2 << 20
	// htChunk and htPause pace the upload as a real client's network
	// would: 32 chunks with 20 ms between them take more than net/http's
	// 500 ms rstAvoidanceDelay, as 2 MiB at 25 Mbit/s does (670 ms). The
	// client is still sending when the 413 arrives, and when net/http
	// closes. (Over loopback at full speed the whole body fits in the
	// server's receive buffer within the delay, the client reads the 413
	// and the FIN before net/http closes, and no reset shows.)
	htChunk = 64 << 10
	htPause = 20 * time.Millisecond
	// htRuns is how many uploads each variant makes; htParallel of them at
	// a time, so that net/http's 500 ms delays overlap.
	htRuns     = 20
	htParallel = 5
	// htBound bounds every wait: a dial, a connection's whole exchange, a
	// Shutdown, an OnClose. A bound, not a timing assertion.
	htBound = 10 * time.Second
)

func htDiscardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func htErrorLog() *log.Logger { return log.New(io.Discard, "", 0) }

// htUploadServer is the server of golang/go#51109: its handler refuses the
// upload with 413 without reading the body, as a handler that checks
// Content-Length first does.
func htUploadServer() *http.Server {
	return &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
		}),
		ReadHeaderTimeout: htBound,
		ErrorLog:          htErrorLog(),
	}
}

// htServe runs srv on ln until the test ends, then shuts it down as the
// Listener's doc says: http.Server.Shutdown, so that the responses in
// flight finish, then, over a sockfsm Listener, Listener.Shutdown, which
// returns once every socket is closed.
func htServe(t *testing.T, srv *http.Server, ln net.Listener) {
	t.Helper()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), htBound)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("http.Server.Shutdown: %v", err)
		}
		if l, ok := ln.(*sockfsm.Listener); ok {
			if err := l.Shutdown(ctx); err != nil {
				t.Errorf("Listener.Shutdown: %v", err)
			}
			if n := l.NumConns(); n != 0 {
				t.Errorf("NumConns after Listener.Shutdown = %d, want 0", n)
			}
		}
		select {
		case err := <-served:
			if !errors.Is(err, http.ErrServerClosed) {
				t.Errorf("http.Server.Serve = %v, want http.ErrServerClosed", err)
			}
		case <-time.After(htBound):
			t.Errorf("http.Server.Serve did not return within %v of Shutdown", htBound)
		}
	})
}

// htCloses records the server's CloseInfo per connection, by the peer's
// address (the client's local address), from Config.OnClose.
type htCloses struct {
	mu    sync.Mutex
	infos map[string]sockfsm.CloseInfo
	done  map[string]chan struct{}
}

func (h *htCloses) ch(addr string) chan struct{} {
	if h.done == nil {
		h.done = make(map[string]chan struct{})
		h.infos = make(map[string]sockfsm.CloseInfo)
	}
	c, ok := h.done[addr]
	if !ok {
		c = make(chan struct{})
		h.done[addr] = c
	}
	return c
}

func (h *htCloses) onClose(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
	addr := c.RemoteAddr.String()
	h.mu.Lock()
	defer h.mu.Unlock()
	ch := h.ch(addr)
	if _, dup := h.infos[addr]; dup {
		h.infos[addr+" (again)"] = info // reported as an error by the tests
		return
	}
	h.infos[addr] = info
	close(ch)
}

// wait returns the CloseInfo of the connection whose peer is at addr,
// waiting up to htBound for it.
func (h *htCloses) wait(addr string) (sockfsm.CloseInfo, bool) {
	h.mu.Lock()
	ch := h.ch(addr)
	h.mu.Unlock()
	select {
	case <-ch:
	case <-time.After(htBound):
		return sockfsm.CloseInfo{}, false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.infos[addr], true
}

func (h *htCloses) all() map[string]sockfsm.CloseInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := make(map[string]sockfsm.CloseInfo, len(h.infos))
	for k, v := range h.infos {
		m[k] = v
	}
	return m
}

// htSOError reads and clears the socket's pending error (SO_ERROR): a reset
// that arrived after the reads ended shows here.
func htSOError(c *net.TCPConn) (syscall.Errno, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		v, gerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ERROR)
	}); err != nil {
		return 0, err
	}
	return syscall.Errno(v), gerr
}

func htIsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// htOutcome is what the uploading client saw.
type htOutcome struct {
	local    string // the client's address: the server's RemoteAddr
	sent     int    // body bytes written
	writeErr error  // the upload's (or its half-close's) error
	raw      []byte // everything read
	readErr  error  // nil: the reads ended with a clean EOF
	soErr    syscall.Errno
	status   int   // the response's, 0 if none could be parsed
	parseErr error // parsing the response, its body included
	conn     *net.TCPConn
}

// reset reports whether a reset showed anywhere: the upload failed with
// ECONNRESET or EPIPE, the reads ended with one, or SO_ERROR held one.
func (o htOutcome) reset() bool {
	return htIsReset(o.writeErr) || htIsReset(o.readErr) || o.soErr != 0
}

// clean reports whether the exchange went as HTTP means it to: the whole
// body uploaded, the whole 413 read, then EOF, and no pending error.
func (o htOutcome) clean() bool {
	return o.writeErr == nil && o.sent == htBody && o.readErr == nil && o.soErr == 0 &&
		o.status == http.StatusRequestEntityTooLarge && o.parseErr == nil
}

func (o htOutcome) String() string {
	return fmt.Sprintf("client %s: sent %d/%d (err %v), read %d bytes (err %v), SO_ERROR %d (%v), status %d (parse err %v)",
		o.local, o.sent, htBody, o.writeErr, len(o.raw), o.readErr, int(o.soErr), o.soErr, o.status, o.parseErr)
}

// htUpload is the client of golang/go#51109, on raw TCP so that it controls
// the pacing: it sends a request announcing htBody bytes, writes them in
// htChunk pieces with a pause between, half-closes, then reads the response
// to EOF. It does not close its connection: the caller does, after it has
// looked at it again (o.conn).
func htUpload(addr string) htOutcome {
	var o htOutcome
	c, err := net.DialTimeout("tcp", addr, htBound)
	if err != nil {
		o.writeErr = err
		return o
	}
	tc := c.(*net.TCPConn)
	o.conn, o.local = tc, c.LocalAddr().String()
	c.SetDeadline(time.Now().Add(htBound))
	_, o.writeErr = fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: sockfsm.test\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", htBody)
	chunk := bytes.Repeat([]byte("x"), htChunk)
	for i := 0; o.writeErr == nil && i < htBody/htChunk; i++ {
		var n int
		n, o.writeErr = c.Write(chunk)
		o.sent += n
		time.Sleep(htPause)
	}
	if o.writeErr == nil {
		o.writeErr = tc.CloseWrite()
	}
	// Read whatever came, even after a failed upload: whether the 413
	// survived is part of the story.
	o.raw, o.readErr = io.ReadAll(c)
	if o.readErr == nil {
		o.soErr, _ = htSOError(tc)
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(o.raw)), nil)
	if err != nil {
		o.parseErr = err
		return o
	}
	o.status = resp.StatusCode
	_, o.parseErr = io.ReadAll(resp.Body) // a cut body is io.ErrUnexpectedEOF
	resp.Body.Close()
	return o
}

// htUploads runs htRuns uploads to addr, htParallel at a time. check, if
// not nil, runs for each outcome before its connection is closed.
func htUploads(addr string, check func(htOutcome)) []htOutcome {
	out := make([]htOutcome, htRuns)
	sem := make(chan struct{}, htParallel)
	var wg sync.WaitGroup
	for i := range out {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			o := htUpload(addr)
			if check != nil {
				check(o)
			}
			if o.conn != nil {
				o.conn.Close()
			}
			out[i] = o
		}()
	}
	wg.Wait()
	return out
}

// TestHTTP51109 reproduces golang/go#51109 on real sockets: a handler that
// answers 413 without reading a large request body. net/http answers,
// half-closes, waits 500 ms and closes with the body's rest unread; the
// kernel then sends RST instead of FIN, and a client still uploading sees
// its upload fail with ECONNRESET or EPIPE, and may lose the 413 it had
// received. Over the Listener, the same server's close lingers: the engine
// reads and discards the rest of the body until the client's FIN, and the
// client gets the whole 413 and a clean EOF.
func TestHTTP51109(t *testing.T) {
	t.Run("plain", func(t *testing.T) {
		checkFDs(t)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		htServe(t, htUploadServer(), ln)
		outs := htUploads(ln.Addr().String(), nil)
		var resets, clean, lost413, wEPIPE, wRESET, rRESET, soErr int
		for _, o := range outs {
			switch {
			case o.reset():
				resets++
				if o.status != http.StatusRequestEntityTooLarge || o.parseErr != nil {
					lost413++
				}
				if resets == 1 {
					t.Logf("the first reset: %v", o)
				}
			case o.clean():
				clean++
			default:
				t.Logf("neither clean nor reset: %v", o)
			}
			switch {
			case errors.Is(o.writeErr, syscall.EPIPE):
				wEPIPE++
			case errors.Is(o.writeErr, syscall.ECONNRESET):
				wRESET++
			}
			if htIsReset(o.readErr) {
				rRESET++
			}
			if o.soErr != 0 {
				soErr++
			}
		}
		// The rate is the kernel's behaviour, logged rather than asserted;
		// on Linux it has been 20/20 in every run here (a close with unread
		// input is always answered with RST, and the client is still
		// uploading then), so that at least one reset shows is asserted
		// there: it is what makes the sockfsm variant below mean something.
		t.Logf("plain net.Listener: %d/%d uploads saw a reset, %d clean. Upload failed with EPIPE %d, ECONNRESET %d; "+
			"reads ended with a reset %d; SO_ERROR set after EOF %d; the 413 lost %d",
			resets, len(outs), clean, wEPIPE, wRESET, rRESET, soErr, lost413)
		if resets == 0 {
			if runtime.GOOS == "linux" {
				t.Errorf("no upload saw a reset over a plain net.Listener: golang/go#51109 did not reproduce")
			} else {
				t.Logf("no upload saw a reset on %s", runtime.GOOS)
			}
		}
	})

	t.Run("sockfsm", func(t *testing.T) {
		checkFDs(t)
		var closes htCloses
		ln, err := sockfsm.Listen("tcp", "127.0.0.1:0", sockfsm.Config{
			// The linger counts the bytes read after our half-close, which
			// net/http makes right after the 413: nearly the whole 2 MiB
			// body arrives after it. With the default bound (1 MiB) the
			// linger would end mid-upload, and the kernel would answer the
			// rest with RST: the bound stops a peer that streams forever.
			// This body is finite and expected, so the bound is above it.
			LingerBytes: 4 << 20,
			OnClose:     closes.onClose,
			Logger:      htDiscardLogger(),
		})
		if err != nil {
			t.Fatal(err)
		}
		htServe(t, htUploadServer(), ln)
		var mu sync.Mutex
		var bad []string
		fail := func(format string, args ...any) {
			mu.Lock()
			bad = append(bad, fmt.Sprintf(format, args...))
			mu.Unlock()
		}
		outs := htUploads(ln.Addr().String(), func(o htOutcome) {
			if !o.clean() {
				fail("not clean: %v", o)
			}
			if o.conn == nil {
				return
			}
			// Once the server has closed its socket, a RST of its own
			// would show in the client's SO_ERROR.
			info, ok := closes.wait(o.local)
			if !ok {
				fail("%s: no OnClose within %v", o.local, htBound)
				return
			}
			if info.Aborted() || !info.PeerFIN || info.Linger != sockfsm.LingerEndPeerFIN {
				fail("%s: server's CloseInfo %+v: want graceful, ended by the client's FIN", o.local, info)
			}
			if e, err := htSOError(o.conn); err != nil || e != 0 {
				fail("%s: SO_ERROR after the server closed = %d (%v), %v", o.local, int(e), e, err)
			}
		})
		for _, b := range bad {
			t.Error(b)
		}
		var discarded int64
		for _, o := range outs {
			info, _ := closes.wait(o.local)
			discarded += info.Discarded
		}
		t.Logf("sockfsm.Listener: %d/%d uploads clean; the lingers discarded %d bytes in all", htRuns-len(bad), htRuns, discarded)
		if n := len(closes.all()); n != htRuns {
			t.Errorf("OnClose called for %d connections, want %d", n, htRuns)
		}
	})
}

// htGet sends a GET for path on c and reads the response whole.
func htGet(c net.Conn, br *bufio.Reader, path string) (*http.Response, []byte, error) {
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: sockfsm.test\r\n\r\n", path); err != nil {
		return nil, nil, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func htDial(t *testing.T, addr string) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, htBound)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(htBound))
	return c.(*net.TCPConn), bufio.NewReader(c)
}

// htReadEOF reads c until EOF or an error: nil means a clean EOF with
// nothing before it.
func htReadEOF(c net.Conn, br *bufio.Reader) error {
	n, err := io.Copy(io.Discard, br)
	if err != nil {
		return err
	}
	if n > 0 {
		return fmt.Errorf("%d unexpected bytes before EOF", n)
	}
	return nil
}

// TestHTTPShutdown: http.Server.Shutdown, then Listener.Shutdown, with
// keep-alive connections open and a request in flight. The in-flight
// response finishes, every idle connection gets a FIN (not a RST), and when
// Listener.Shutdown returns every socket is closed: NumConns is 0 and
// OnClose was called for every connection, gracefully. Half of the idle
// clients close on the server's FIN; the others keep their sockets open, so
// that only the linger's own bound (LingerTimeout) ends theirs: without
// Listener.Shutdown they would still be open.
func TestHTTPShutdown(t *testing.T) {
	checkFDs(t)
	var closes htCloses
	l, err := sockfsm.Listen("tcp", "127.0.0.1:0", sockfsm.Config{
		LingerTimeout: 200 * time.Millisecond,
		OnClose:       closes.onClose,
		Logger:        htDiscardLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	inSlow := make(chan struct{}, 1)
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		inSlow <- struct{}{}
		select {
		case <-release:
		case <-time.After(htBound):
		}
		io.WriteString(w, "slow done\n")
	})
	srv := &http.Server{
		Handler:  mux,
		ErrorLog: htErrorLog(),
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				accepted.Add(1)
			}
		},
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	addr := l.Addr().String()

	// Keep-alive clients: two requests each on one connection, left open.
	const idle = 4
	type client struct {
		c  *net.TCPConn
		br *bufio.Reader
	}
	var clients []client
	for range idle {
		c, br := htDial(t, addr)
		for range 2 {
			resp, body, err := htGet(c, br, "/")
			if err != nil || resp.StatusCode != http.StatusOK || string(body) != "hello\n" {
				t.Fatalf("GET /: %v %q %v", resp, body, err)
			}
		}
		clients = append(clients, client{c, br})
	}
	// A request in flight.
	busy, busyBR := htDial(t, addr)
	if _, err := io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: sockfsm.test\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inSlow:
	case <-time.After(htBound):
		t.Fatal("the slow handler did not start")
	}

	ctx, cancel := context.WithTimeout(context.Background(), htBound)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(ctx) }()

	// The idle connections get the server's FIN: half of the clients
	// close then.
	var wg sync.WaitGroup
	eofs := make([]error, idle)
	for i := 0; i < idle; i += 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			eofs[i] = htReadEOF(clients[i].c, clients[i].br)
			clients[i].c.Close()
		}()
	}
	wg.Wait()
	for i := 0; i < idle; i += 2 {
		if eofs[i] != nil {
			t.Errorf("idle client %d: %v, want a clean EOF", i, eofs[i])
		}
	}
	// Shutdown has begun: the in-flight response may finish.
	close(release)
	resp, err := http.ReadResponse(busyBR, nil)
	if err != nil {
		t.Fatalf("the in-flight response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "slow done\n" {
		t.Errorf("the in-flight response: %d %q %v", resp.StatusCode, body, err)
	}
	if err := htReadEOF(busy, busyBR); err != nil {
		t.Errorf("after the in-flight response: %v, want a clean EOF", err)
	}
	busy.Close()

	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("http.Server.Shutdown: %v", err)
		}
	case <-time.After(htBound):
		t.Fatal("http.Server.Shutdown did not return")
	}
	if err := l.Shutdown(ctx); err != nil {
		t.Errorf("Listener.Shutdown: %v", err)
	}
	if n := l.NumConns(); n != 0 {
		t.Errorf("NumConns after Listener.Shutdown = %d, want 0", n)
	}
	infos := closes.all()
	if int64(len(infos)) != accepted.Load() || len(infos) != idle+1 {
		t.Errorf("OnClose called for %d connections; net/http saw %d, the test made %d", len(infos), accepted.Load(), idle+1)
	}
	for addr, info := range infos {
		if info.Aborted() {
			t.Errorf("%s: aborted: %+v", addr, info)
		}
	}
	select {
	case err := <-served:
		if !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("http.Server.Serve = %v, want http.ErrServerClosed", err)
		}
	case <-time.After(htBound):
		t.Error("http.Server.Serve did not return")
	}
	// The clients that kept their sockets open read the FIN now.
	for i := 1; i < idle; i += 2 {
		if err := htReadEOF(clients[i].c, clients[i].br); err != nil {
			t.Errorf("idle client %d: %v, want a clean EOF", i, err)
		}
		if e, err := htSOError(clients[i].c); err != nil || e != 0 {
			t.Errorf("idle client %d: SO_ERROR %d (%v), %v", i, int(e), e, err)
		}
	}
}

// TestHTTPEngineTimeouts: the engine's own timeouts do not get in net/http's
// way.
func TestHTTPEngineTimeouts(t *testing.T) {
	start := func(t *testing.T, cfg sockfsm.Config, srv *http.Server) (string, *htCloses, *atomic.Int64) {
		t.Helper()
		checkFDs(t)
		closes := new(htCloses)
		cfg.OnClose = closes.onClose
		cfg.Logger = htDiscardLogger()
		l, err := sockfsm.Listen("tcp", "127.0.0.1:0", cfg)
		if err != nil {
			t.Fatal(err)
		}
		accepted := new(atomic.Int64)
		srv.ErrorLog = htErrorLog()
		srv.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				accepted.Add(1)
			}
		}
		htServe(t, srv, l)
		return l.Addr().String(), closes, accepted
	}
	graceful := func(t *testing.T, closes *htCloses, c net.Conn) {
		t.Helper()
		info, ok := closes.wait(c.LocalAddr().String())
		switch {
		case !ok:
			t.Errorf("no OnClose within %v", htBound)
		case info.Aborted():
			t.Errorf("the server aborted: %+v", info)
		}
	}

	// With a zero Config, one connection carries several requests, with
	// pauses between them as a browser's would have.
	t.Run("keep-alive", func(t *testing.T) {
		addr, closes, accepted := start(t, sockfsm.Config{}, &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, r.RemoteAddr)
			}),
		})
		c, br := htDial(t, addr)
		for i := range 3 {
			if i > 0 {
				time.Sleep(300 * time.Millisecond)
			}
			resp, body, err := htGet(c, br, "/")
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			if resp.StatusCode != http.StatusOK || string(body) != c.LocalAddr().String() {
				t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, body, c.LocalAddr())
			}
		}
		if n := accepted.Load(); n != 1 {
			t.Errorf("net/http accepted %d connections, want 1", n)
		}
		c.CloseWrite()
		if err := htReadEOF(c, br); err != nil {
			t.Errorf("after the client's FIN: %v, want a clean EOF", err)
		}
		c.Close()
		graceful(t, closes, c)
	})

	// net/http's own IdleTimeout closes an idle keep-alive connection: a
	// FIN, which the client reads as EOF.
	t.Run("http-idle-timeout", func(t *testing.T) {
		addr, closes, _ := start(t, sockfsm.Config{}, &http.Server{
			Handler:     http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") }),
			IdleTimeout: 200 * time.Millisecond,
		})
		c, br := htDial(t, addr)
		resp, body, err := htGet(c, br, "/")
		if err != nil || resp.StatusCode != http.StatusOK || string(body) != "hello\n" {
			t.Fatalf("GET /: %v %q %v", resp, body, err)
		}
		if err := htReadEOF(c, br); err != nil {
			t.Errorf("idle keep-alive connection: %v, want a clean EOF", err)
		}
		if e, err := htSOError(c); err != nil || e != 0 {
			t.Errorf("SO_ERROR %d (%v), %v", int(e), e, err)
		}
		c.Close()
		graceful(t, closes, c)
	})

	// A handler that takes longer than the engine's WriteTimeout before it
	// answers: the time to produce the response is not a flush, so the
	// whole response arrives.
	t.Run("slow-handler", func(t *testing.T) {
		want := bytes.Repeat([]byte("sockfsm "), 8<<10) // 64 KiB
		addr, closes, _ := start(t, sockfsm.Config{WriteTimeout: 100 * time.Millisecond}, &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				time.Sleep(300 * time.Millisecond)
				w.Write(want)
			}),
		})
		c, br := htDial(t, addr)
		resp, body, err := htGet(c, br, "/")
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, want) {
			t.Fatalf("GET /: status %v, %d/%d bytes, %v", resp, len(body), len(want), err)
		}
		c.CloseWrite()
		if err := htReadEOF(c, br); err != nil {
			t.Errorf("after the client's FIN: %v, want a clean EOF", err)
		}
		c.Close()
		graceful(t, closes, c)
	})
}
