package sockfsm_test

// Server-level property: many connections, each with a peer that behaves
// as rapid draws, over in-memory pipes (transport.Pipe, with real
// half-close and RST semantics), and a Shutdown at a random moment with a
// random deadline. Whatever happens, Shutdown returns only when every
// connection is closed, Serve returns ErrServerClosed, every peer sees its
// connection end, and no goroutine is left behind.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/transport"
)

// pipeListener is a net.Listener whose connections are transport.Pipe ends.
type pipeListener struct {
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return transport.PipeAddr(0) }

// dial hands the server one end of a new pipe and returns the other.
func (l *pipeListener) dial() (transport.Stream, error) {
	client, server := transport.PipeSize(4096)
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		client.Close()
		server.Close()
		return nil, net.ErrClosed
	}
}

// peer behaviours.
const (
	peerEcho   = iota // send, half-close, read to EOF
	peerIdle          // send nothing, read to EOF
	peerNoRead        // send a lot, never read
	peerNoFIN         // send, read the echo, never half-close
	peerReset         // send, then reset
	numPeerKinds
)

type peerResult struct {
	kind    int
	sent    []byte
	got     []byte
	ended   bool // saw EOF or an error: the server's end is gone or going
	reset   bool
	readErr error
}

func runPeer(c transport.Stream, kind int, msg []byte) peerResult {
	r := peerResult{kind: kind}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails instead of hanging
	switch kind {
	case peerEcho, peerNoFIN:
		n, _ := c.Write(msg)
		r.sent = msg[:n]
		if kind == peerEcho {
			c.CloseWrite()
		}
	case peerNoRead:
		for range 64 { // up to 256 KiB, far more than the pipe holds
			n, err := c.Write(bytes.Repeat([]byte{'z'}, 4096))
			r.sent = append(r.sent, bytes.Repeat([]byte{'z'}, n)...)
			if err != nil {
				break
			}
		}
		// It never reads: wait for the server to close it, seen as a
		// failed write.
		for range 1000 {
			if _, err := c.Write([]byte{'z'}); err != nil {
				r.ended = true
				return r
			}
			time.Sleep(time.Millisecond)
		}
		return r
	case peerReset:
		c.Write(msg)
		c.Abort()
		r.ended = true
		return r
	}
	buf := make([]byte, 1024)
	for {
		n, err := c.Read(buf)
		r.got = append(r.got, buf[:n]...)
		if err != nil {
			r.ended = err == io.EOF || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
			r.reset = errors.Is(err, syscall.ECONNRESET)
			r.readErr = err
			return r
		}
	}
}

func TestServerShutdownProperty(t *testing.T) {
	defer goleak.VerifyNone(t)
	rapid.Check(t, func(rt *rapid.T) {
		cfg := sockfsm.Config{
			IdleTimeout:   time.Duration(rapid.IntRange(20, 300).Draw(rt, "idle-ms")) * time.Millisecond,
			WriteTimeout:  time.Duration(rapid.IntRange(20, 300).Draw(rt, "write-ms")) * time.Millisecond,
			LingerTimeout: time.Duration(rapid.IntRange(10, 100).Draw(rt, "linger-timeout-ms")) * time.Millisecond,
			LingerTime:    time.Duration(rapid.IntRange(10, 300).Draw(rt, "linger-time-ms")) * time.Millisecond,
			Logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		var mu sync.Mutex
		infos := map[uint64]sockfsm.CloseInfo{}
		srv := &sockfsm.Server{Config: cfg, NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler {
			return &shutdownRecorder{mu: &mu, infos: infos}
		}}
		ln := newPipeListener()
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()

		n := rapid.IntRange(1, 20).Draw(rt, "conns")
		results := make([]peerResult, n)
		var wg sync.WaitGroup
		for i := range n {
			kind := rapid.IntRange(0, numPeerKinds-1).Draw(rt, "kind")
			msg := bytes.Repeat([]byte{byte('a' + i%26)}, rapid.IntRange(1, 3000).Draw(rt, "len"))
			c, err := ln.dial()
			if err != nil {
				rt.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i] = runPeer(c, kind, msg)
			}()
		}
		time.Sleep(time.Duration(rapid.IntRange(0, 50).Draw(rt, "shutdown-after-ms")) * time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rapid.IntRange(0, 300).Draw(rt, "deadline-ms"))*time.Millisecond)
		err := srv.Shutdown(ctx)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			rt.Fatalf("Shutdown: %v", err)
		}
		// Shutdown returned: every connection is closed.
		if k := srv.NumConns(); k != 0 {
			rt.Fatalf("%d connections open after Shutdown returned", k)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			rt.Fatalf("Serve returned %v", err)
		}
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(infos) != n {
			rt.Fatalf("OnClose heard of %d connections, want %d", len(infos), n)
		}
		for i, r := range results {
			if !r.ended {
				rt.Fatalf("peer %d (kind %d) never saw its connection end", i, r.kind)
			}
			if r.kind == peerEcho && !r.reset && !bytes.Equal(r.got, r.sent) && !bytes.HasPrefix(r.sent, r.got) {
				rt.Fatalf("peer %d: echo %q is not a prefix of %q", i, r.got, r.sent)
			}
			// A graceful shutdown (nil) resets no well-behaved peer.
			if err == nil && r.reset && r.kind == peerEcho {
				rt.Fatalf("peer %d was reset although Shutdown was graceful", i)
			}
		}
		for id, info := range infos {
			if err == nil && info.Reason == sockfsm.ReasonShutdownDeadline {
				rt.Fatalf("conn %d aborted at the deadline, but Shutdown returned nil", id)
			}
		}
	})
}

type shutdownRecorder struct {
	mu    *sync.Mutex
	infos map[uint64]sockfsm.CloseInfo
}

func (h *shutdownRecorder) OnData(c *sockfsm.Conn, p []byte) { c.Write(p) }

func (h *shutdownRecorder) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.infos[c.Info().ID] = info
}
