//go:build unix

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sockfsm/sockfsm"
)

// TestMain fails the run if any goroutine outlives the tests.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// bound bounds every wait in these tests. A bound, not a timing assertion.
const bound = 10 * time.Second

// serve runs NewServer on a Listener with Config, as run does, and shuts
// both down in run's order when the test ends. onClose receives each
// connection's CloseInfo.
func serve(t *testing.T, onClose func(sockfsm.ConnInfo, sockfsm.CloseInfo)) string {
	t.Helper()
	logger := slog.New(slog.DiscardHandler)
	cfg := Config(logger)
	cfg.OnClose = onClose
	ln, err := sockfsm.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(logger)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("http.Server.Shutdown: %v", err)
		}
		if err := ln.Shutdown(ctx); err != nil {
			t.Errorf("Listener.Shutdown: %v", err)
		}
		if n := ln.NumConns(); n != 0 {
			t.Errorf("NumConns = %d after Listener.Shutdown", n)
		}
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve = %v", err)
		}
	})
	return ln.Addr().String()
}

func get(t *testing.T, addr string) {
	t.Helper()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: bound}
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "hello from net/http on sockfsm\n" {
		t.Fatalf("GET /: %d %q %v", resp.StatusCode, body, err)
	}
}

func TestGet(t *testing.T) {
	get(t, serve(t, nil))
}

// TestRefusedUploadDoesNotReset: a client uploads 2 MiB, more than
// MaxUpload and than the 256 KiB net/http drains itself, at a pace that
// outlasts net/http's 500 ms wait before it closes (64 KiB every 20 ms);
// the handler answers 413 without reading it. Over a plain net.Listener the
// close with the body unread makes the kernel send RST, and the upload
// fails with EPIPE or ECONNRESET (golang/go#51109). Here the client
// uploads everything, half-closes, reads the whole 413 and a clean EOF; the
// server's close is graceful, its linger ended by the client's FIN.
func TestRefusedUploadDoesNotReset(t *testing.T) {
	const size, chunk = 2 << 20, 64 << 10
	closed := make(chan sockfsm.CloseInfo, 1)
	var once sync.Once
	addr := serve(t, func(_ sockfsm.ConnInfo, info sockfsm.CloseInfo) {
		once.Do(func() { closed <- info })
	})

	c, err := net.DialTimeout("tcp", addr, bound)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(bound))
	if _, err := fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: example\r\nContent-Length: %d\r\n\r\n", size); err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte("x"), chunk)
	for i := 0; i < size/chunk; i++ {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("the upload failed after %d bytes: %v", i*chunk, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("response: %d %q %v, want the whole 413", resp.StatusCode, body, err)
	}
	if n, err := io.Copy(io.Discard, br); n != 0 || err != nil {
		t.Fatalf("after the response: %d bytes, %v; want a clean EOF", n, err)
	}
	select {
	case info := <-closed:
		if info.Aborted() || info.Linger != sockfsm.LingerEndPeerFIN {
			t.Errorf("server's CloseInfo %+v: want graceful, the linger ended by our FIN", info)
		}
	case <-time.After(bound):
		t.Fatal("the server did not close the connection")
	}
}

// TestRun runs the program: it serves, and SIGTERM stops it with exit code
// 0.
func TestRun(t *testing.T) {
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	code := make(chan int, 1)
	var stderr bytes.Buffer // read only after code is received
	go func() {
		code <- run([]string{"-addr", "127.0.0.1:0", "-shutdown-timeout", "5s"}, &stderr, sigs, ready)
	}()
	select {
	case addr := <-ready:
		// Stop it even if get fails.
		defer func() {
			sigs <- syscall.SIGTERM
			select {
			case c := <-code:
				if c != 0 {
					t.Errorf("run exited with %d: %s", c, stderr.String())
				}
			case <-time.After(bound):
				t.Fatal("run did not return after SIGTERM")
			}
		}()
		get(t, addr.String())
	case c := <-code:
		t.Fatalf("run exited with %d: %s", c, stderr.String())
	case <-time.After(bound):
		t.Fatal("run did not start listening")
	}
}
