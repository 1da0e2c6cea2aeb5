package drivertest

// Peers that misbehave: a reset mid-stream, a trickle, a flood that never
// reads. docs/failure-modes.md has the details behind each.

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// testPeerReset: a client that aborts (SO_LINGER 0, so its kernel sends
// RST) in the middle of an echo exchange, whether the server is waiting for
// input or blocked flushing output to it, ends its connection as
// ReasonPeerReset with an error matching ErrPeerReset and ECONNRESET; a
// bystander connection open meanwhile and a new client are served as usual.
//
// The reason is deterministic, whichever of read or write the server is in:
// on Linux the RST sets the socket's pending error to ECONNRESET, and the
// next read or write on it returns that error (write reports EPIPE only once
// the pending error has been consumed, and the engine stops at the first
// error). A read that still finds data queued before the RST returns the
// data first, and the error on the next call.
func testPeerReset(t *testing.T, f Factory) {
	cases := []struct {
		name string
		// provoke leaves the server's connection to c in the middle of
		// the exchange.
		provoke func(t *testing.T, c *net.TCPConn)
	}{
		{"Receiving", func(t *testing.T, c *net.TCPConn) {
			// The whole echo comes back: the server is waiting for more.
			msg := conntest.Pattern(1, 1000)
			conntest.MustWrite(t, c, msg)
			if got := conntest.ReadFull(t, c, len(msg)); !bytes.Equal(got, msg) {
				t.Fatalf("the echo is not what was sent")
			}
		}},
		{"Sending", func(t *testing.T, c *net.TCPConn) {
			// Flood without reading: the echo fills the client's receive
			// buffer and the server's send buffer, so the server blocks
			// in a write and stops reading, and then so does the
			// client's write, until this deadline (a way to wait for the
			// stall, not an assertion: if the write returns earlier the
			// reset still lands mid-stream).
			big := make([]byte, 64<<20) // before the deadline: under -race the allocation can take longer than it
			c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
			n, err := c.Write(big)
			if err == nil {
				t.Fatalf("a 64 MiB write to a server whose echo is never read returned no error")
			}
			c.SetWriteDeadline(time.Now().Add(clientDeadline))
			t.Logf("client wrote %d bytes before its write deadline", n)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			check(t)
			s := start(t, f, sockfsm.Config{WriteTimeout: clientDeadline, IdleTimeout: clientDeadline}, conntest.Always(sockfsm.Echo{}))

			// A bystander is mid-exchange while the other client resets.
			bystander := dial(t, s.addr)
			msg := conntest.Pattern(7, 3000)
			conntest.MustWrite(t, bystander, msg[:1000])

			c := dial(t, s.addr)
			tc.provoke(t, c)
			t.Logf("the server's connection is %v when the client resets", s.state(c))
			if err := c.SetLinger(0); err != nil {
				t.Fatalf("SetLinger(0): %v", err)
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}

			info := s.closed(t, c)
			t.Logf("CloseInfo: reason %v, err %v, read %d, written %d", info.Reason, info.Err, info.BytesRead, info.BytesWritten)
			conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerReset, Aborted: true, Err: sockfsm.ErrPeerReset, BytesRead: -1, BytesWritten: -1})
			if !errors.Is(info.Err, syscall.ECONNRESET) {
				t.Errorf("CloseInfo.Err = %v, want it to match ECONNRESET too", info.Err)
			}
			if info.BytesRead == 0 {
				t.Errorf("CloseInfo.BytesRead = 0: the reset was not mid-stream")
			}

			// The bystander finishes its exchange.
			conntest.MustWrite(t, bystander, msg[1000:])
			conntest.CloseWrite(t, bystander)
			if got := conntest.ReadToEOF(t, bystander); !bytes.Equal(got, msg) {
				t.Fatalf("bystander's echo: %d bytes (equal: %v); want %d bytes then EOF", len(got), bytes.Equal(got, msg), len(msg))
			}
			conntest.CheckInfo(t, s.closed(t, bystander), conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true,
				BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})

			// And a new client is served.
			fresh := exchange(t, s.addr, []byte("this is a test"))
			if info := s.closed(t, fresh); info.Reason != sockfsm.ReasonPeerClosed {
				t.Errorf("new client's CloseInfo.Reason = %v, want %v", info.Reason, sockfsm.ReasonPeerClosed)
			}
		})
	}
}

// slowlorisRun is the outcome of one trickling client.
type slowlorisRun struct {
	info    sockfsm.CloseInfo
	sent    int // bytes the client sent
	echoed  int // bytes echoed before the server's FIN
	readErr error
}

// trickle runs a client that sends one byte every interval, at most max
// bytes, while reading the echo. It stops sending once it reads the
// server's EOF (or an error), then closes; if it sent max bytes without
// seeing EOF, it half-closes and reads on. The echo must be a prefix of what
// was sent.
func trickle(t *testing.T, s *server, interval time.Duration, max int) slowlorisRun {
	t.Helper()
	c := dial(t, s.addr)
	var (
		mu       sync.Mutex
		sent     []byte
		writeErr error
		writeMu  sync.Mutex // serializes the writer's last write with CloseWrite
	)
	stop := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for i := 0; i < max; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			b := byte('a' + i%26)
			mu.Lock()
			sent = append(sent, b)
			mu.Unlock()
			writeMu.Lock()
			_, err := c.Write([]byte{b})
			writeMu.Unlock()
			if err != nil {
				mu.Lock()
				writeErr = err
				mu.Unlock()
				return
			}
		}
		// Sent everything without being closed: end the exchange ourselves.
		writeMu.Lock()
		c.CloseWrite()
		writeMu.Unlock()
	}()
	got, err := io.ReadAll(c)
	close(stop)
	<-writerDone
	c.Close() // every byte was read: a FIN, not a reset

	mu.Lock()
	defer mu.Unlock()
	if !bytes.HasPrefix(sent, got) {
		t.Fatalf("echo %q is not a prefix of what was sent, %q", got, sent)
	}
	// A reset is reported once, to the first call that meets it: if the
	// writer met it, the reader saw EOF.
	if err == nil && isWriteReset(writeErr) {
		err = writeErr
	}
	return slowlorisRun{info: s.closed(t, c), sent: len(sent), echoed: len(got), readErr: err}
}

// testSlowloris: a peer that sends one byte every 50 ms is never idle for
// IdleTimeout (200 ms), so the idle timeout alone never closes it: it keeps
// the connection as long as it trickles. MaxLifetime (500 ms) bounds it: the
// engine closes it gracefully, with our FIN. The client reads the echo of
// what arrived before that, then EOF, not a reset, stops sending and
// closes; the engine's linger sees the client's FIN.
//
// A trickling client's timing rests on the scheduler: if the client or the
// server stalls for longer than IdleTimeout (under -race on a loaded
// machine, say), the idle timeout fires first. Such a run is retried, up to
// 3 attempts; a bug that makes the idle timeout fire fails all three.
func testSlowloris(t *testing.T, f Factory) {
	const (
		interval = 50 * time.Millisecond
		idle     = 200 * time.Millisecond
		lifetime = 500 * time.Millisecond
		attempts = 3
	)
	t.Run("MaxLifetime", func(t *testing.T) {
		check(t)
		s := start(t, f, sockfsm.Config{IdleTimeout: idle, MaxLifetime: lifetime, WriteTimeout: clientDeadline,
			LingerTimeout: clientDeadline, LingerTime: clientDeadline}, conntest.Always(sockfsm.Echo{}))
		for attempt := 1; ; attempt++ {
			// 200 bytes at 50 ms is 10 s: far past MaxLifetime, bounded.
			r := trickle(t, s, interval, 200)
			t.Logf("attempt %d: sent %d bytes, %d echoed; CloseInfo: reason %v, linger %v, read %d, written %d, discarded %d, err %v",
				attempt, r.sent, r.echoed, r.info.Reason, r.info.Linger, r.info.BytesRead, r.info.BytesWritten, r.info.Discarded, r.info.Err)
			if r.info.Reason == sockfsm.ReasonIdleTimeout && attempt < attempts {
				t.Logf("attempt %d: the idle timeout fired first (a stall longer than %v); retrying", attempt, idle)
				continue
			}
			if r.readErr != nil {
				t.Errorf("the client read %v after %d bytes of echo; want EOF (a graceful close, not a reset)", r.readErr, r.echoed)
			}
			if r.info.Reason != sockfsm.ReasonMaxLifetime || r.info.Aborted() {
				t.Errorf("CloseInfo.Reason = %v, want %v (graceful)", r.info.Reason, sockfsm.ReasonMaxLifetime)
			}
			if r.info.Linger != sockfsm.LingerEndPeerFIN {
				t.Errorf("CloseInfo.Linger = %v, want %v: the client closed once it read EOF", r.info.Linger, sockfsm.LingerEndPeerFIN)
			}
			if r.info.BytesWritten != int64(r.echoed) {
				t.Errorf("CloseInfo.BytesWritten = %d, but the client read %d bytes before EOF", r.info.BytesWritten, r.echoed)
			}
			if r.sent >= 200 {
				t.Errorf("the client sent all %d bytes: MaxLifetime did not end the connection", r.sent)
			}
			return
		}
	})

	// Without MaxLifetime the same peer keeps its connection for as long as
	// it likes: here 20 bytes, 1 s, five idle timeouts' worth, after which
	// it half-closes and gets its whole echo.
	t.Run("IdleTimeoutAlone", func(t *testing.T) {
		check(t)
		s := start(t, f, sockfsm.Config{IdleTimeout: idle, WriteTimeout: clientDeadline,
			LingerTimeout: clientDeadline, LingerTime: clientDeadline}, conntest.Always(sockfsm.Echo{}))
		for attempt := 1; ; attempt++ {
			r := trickle(t, s, interval, 20)
			t.Logf("attempt %d: sent %d bytes, %d echoed; CloseInfo: reason %v, duration %v", attempt, r.sent, r.echoed, r.info.Reason, r.info.Duration)
			if r.info.Reason == sockfsm.ReasonIdleTimeout && attempt < attempts {
				t.Logf("attempt %d: the idle timeout fired (a stall longer than %v); retrying", attempt, idle)
				continue
			}
			if r.readErr != nil || r.info.Reason != sockfsm.ReasonPeerClosed || r.sent != 20 || r.echoed != 20 {
				t.Errorf("sent %d, echoed %d, read error %v, reason %v; want all 20 bytes echoed, EOF, %v",
					r.sent, r.echoed, r.readErr, r.info.Reason, sockfsm.ReasonPeerClosed)
			}
			return
		}
	})

	// MinRate closes a trickler whose input is not answered (a handler of a
	// protocol that answers only whole requests): 100 B/s over 300 ms
	// windows needs 30 bytes a window; a byte every 50 ms brings at most 7.
	// The engine half-closes at the end of the window the first byte began,
	// gracefully: the client reads EOF, not a reset.
	sink := sockfsm.HandlerFunc(func(*sockfsm.Conn, []byte) {})
	rateCfg := sockfsm.Config{IdleTimeout: idle, MinRate: 100, MinRateWindow: 300 * time.Millisecond,
		WriteTimeout: clientDeadline, LingerTimeout: clientDeadline, LingerTime: clientDeadline}
	t.Run("MinRate", func(t *testing.T) {
		check(t)
		s := start(t, f, rateCfg, conntest.Always(sink))
		for attempt := 1; ; attempt++ {
			r := trickle(t, s, interval, 200)
			t.Logf("attempt %d: sent %d bytes; CloseInfo: reason %v, linger %v, read %d, duration %v", attempt, r.sent, r.info.Reason, r.info.Linger, r.info.BytesRead, r.info.Duration)
			if r.info.Reason == sockfsm.ReasonIdleTimeout && attempt < attempts {
				t.Logf("attempt %d: the idle timeout fired first (a stall longer than %v); retrying", attempt, idle)
				continue
			}
			if r.readErr != nil {
				t.Errorf("the client read %v; want EOF (a graceful close, not a reset)", r.readErr)
			}
			if r.info.Reason != sockfsm.ReasonMinRate || r.info.Aborted() || r.info.Linger != sockfsm.LingerEndPeerFIN {
				t.Errorf("CloseInfo %+v; want %v, graceful, the linger ended by the client's FIN", r.info, sockfsm.ReasonMinRate)
			}
			if r.sent >= 200 {
				t.Errorf("the client sent all %d bytes: MinRate did not end the connection", r.sent)
			}
			return
		}
	})
	// An honest peer sending above the rate, to the same sink, is never
	// closed by MinRate: 64 bytes every 20 ms for a second, then its FIN.
	// Each write alone is more than a window needs, so a stalled client or
	// server cannot make a window fall short.
	t.Run("MinRateHonest", func(t *testing.T) {
		check(t)
		s := start(t, f, rateCfg, conntest.Always(sink))
		c := dial(t, s.addr)
		const writes = 50
		chunk := bytes.Repeat([]byte{'h'}, 64)
		for range writes {
			conntest.MustWrite(t, c, chunk)
			time.Sleep(20 * time.Millisecond)
		}
		conntest.CloseWrite(t, c)
		if got := conntest.ReadToEOF(t, c); len(got) != 0 {
			t.Fatalf("read %q; want EOF", got)
		}
		c.Close()
		info := s.closed(t, c)
		if info.Reason != sockfsm.ReasonPeerClosed || info.BytesRead != writes*64 {
			t.Errorf("CloseInfo %+v; want %v after all %d bytes", info, sockfsm.ReasonPeerClosed, writes*64)
		}
	})
}

// testFlood: a peer that floods input and never reads the echo. The engine
// reads only in Receiving, never while Sending, so once the echo cannot be
// flushed it stops reading, and TCP flow control stops the peer. What the
// server holds for the connection is then bounded by ReadBufferSize plus
// the output queued for one chunk, plus the kernel's socket buffers; the
// write timeout then aborts the connection (RST). The client tries to send
// 64 MiB; the server reads far less.
func testFlood(t *testing.T, f Factory) {
	const (
		flood    = 64 << 20
		readBuf  = sockfsm.DefaultReadBufferSize
		maxBound = 16 << 20 // a loose bound: the kernel buffers of both sockets are a few MiB
	)
	s := start(t, f, sockfsm.Config{WriteTimeout: 500 * time.Millisecond, ReadBufferSize: readBuf}, conntest.Always(sockfsm.Echo{}))
	c := dial(t, s.addr)

	// The write blocks once the buffers are full, until the server's
	// abort makes it fail; clientDeadline bounds it.
	n, err := c.Write(conntest.Pattern(3, flood))
	info := s.closed(t, c)
	t.Logf("client: wrote %d of %d bytes, then %v", n, flood, err)
	t.Logf("server: read %d bytes, wrote %d, reason %v (%v)", info.BytesRead, info.BytesWritten, info.Reason, info.Err)
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonWriteTimeout, Aborted: true, Err: sockfsm.ErrWriteTimeout, BytesRead: -1, BytesWritten: -1})
	if err == nil || n >= flood {
		t.Errorf("the client wrote %d of %d bytes with error %v: flow control did not stop it", n, flood, err)
	} else if !isWriteReset(err) && !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("client write: %v; want a reset (the server's abort)", err)
	}
	if info.BytesRead >= maxBound {
		t.Errorf("the server read %d bytes from a peer that never read: want less than %d", info.BytesRead, maxBound)
	}
	// The engine's own share: with Echo, it never holds more than the chunk
	// it is flushing.
	if held := info.BytesRead - info.BytesWritten; held > int64(readBuf) {
		t.Errorf("the server read %d bytes more than it wrote: want at most ReadBufferSize = %d", held, readBuf)
	}
}
