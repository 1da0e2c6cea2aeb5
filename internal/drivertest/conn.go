package drivertest

// The lifecycle of one connection: the tutorial's exchange, the timeouts,
// the linger and its bounds, what the handler may and may not write.

import (
	"bytes"
	"errors"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// tutorialEvents is the lifecycle of the Winsock tutorial's connection: the
// client sends, half-closes and reads to EOF. A chunk may in principle
// arrive in pieces, each echoed: hence the repetition.
var tutorialEvents = regexp.MustCompile(`^start( input output flushed)+ peer-fin half-close fin-sent close close-done$`)

// testTutorialFlow is the Winsock tutorial's client against the echo
// server: dial, send "this is a test", shutdown(SD_SEND), receive until the
// server's FIN. The client gets exactly its bytes back and then EOF, never
// a reset, and the server's connection takes the path Receiving ⇄ Sending,
// then half-closes after the peer's FIN and closes without lingering.
func testTutorialFlow(t *testing.T, f Factory) {
	for _, tc := range []struct{ name, host string }{{"IPv4", "127.0.0.1"}, {"IPv6", "::1"}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.host == "::1" && !nettest.SupportsIPv6() {
				t.Skip("IPv6 is not available")
			}
			check(t)
			s := startOn(t, f, net.JoinHostPort(tc.host, "0"), sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
			const msg = "this is a test"
			c := exchange(t, s.addr, []byte(msg))

			info := s.closed(t, c)
			conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, Linger: sockfsm.LingerEndNone, PeerFIN: true,
				BytesRead: int64(len(msg)), BytesWritten: int64(len(msg))})
			if info.Discarded != 0 {
				t.Errorf("CloseInfo.Discarded = %d, want 0", info.Discarded)
			}

			edges := s.edgesOf(c)
			if err := pathError(edges); err != nil {
				t.Error(err)
			}
			var evs []string
			for _, e := range edges {
				evs = append(evs, e.Ev.String())
			}
			if s := strings.Join(evs, " "); !tutorialEvents.MatchString(s) {
				t.Errorf("events %q do not match %s", s, tutorialEvents)
			}
			t.Logf("lifecycle: %s", describe(edges))
		})
	}
}

// testIdleTimeout: a client that sends nothing for IdleTimeout gets the
// server's FIN (EOF, not a reset), whether it never sent anything or went
// silent after an exchange.
func testIdleTimeout(t *testing.T, f Factory) {
	cfg := sockfsm.Config{IdleTimeout: 100 * time.Millisecond}
	t.Run("Silent", func(t *testing.T) {
		check(t)
		s := start(t, f, cfg, conntest.Always(sockfsm.Echo{}))
		c := dial(t, s.addr)
		if got := conntest.ReadToEOF(t, c); len(got) != 0 {
			t.Fatalf("client received %q, want nothing", got)
		}
		c.Close()
		conntest.CheckInfo(t, s.closed(t, c), conntest.WantInfo{Reason: sockfsm.ReasonIdleTimeout, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true})
	})
	t.Run("AfterEcho", func(t *testing.T) {
		check(t)
		s := start(t, f, cfg, conntest.Always(sockfsm.Echo{}))
		c := dial(t, s.addr)
		echo(t, c, "ping")
		if got := conntest.ReadToEOF(t, c); len(got) != 0 {
			t.Fatalf("client received %q after the echo, want nothing", got)
		}
		c.Close()
		conntest.CheckInfo(t, s.closed(t, c), conntest.WantInfo{Reason: sockfsm.ReasonIdleTimeout, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
			BytesRead: 4, BytesWritten: 4})
	})
}

// testIdleTimeoutAfterIgnoredInput: input counts as activity even when the
// handler answers nothing. A client sends a byte every IdleTimeout/4, for
// twice IdleTimeout in all, to a handler that ignores input, and then goes
// quiet: the connection is closed for the idle timeout, gracefully (the
// client reads EOF, not a reset), and only once the bytes stopped: every
// byte sent was read while Receiving and handed to the handler, none
// discarded by a linger that began while they were still arriving.
//
// The client checks its own pacing: if it was itself descheduled for more
// than IdleTimeout/2 between two bytes, the attempt proves nothing and is
// run again (at most three attempts).
func testIdleTimeoutAfterIgnoredInput(t *testing.T, f Factory) {
	const (
		idle      = 200 * time.Millisecond
		every     = idle / 4
		bytesSent = 8 // 2 × IdleTimeout of input
	)
	var mu sync.Mutex
	handed := map[string]int{} // bytes handed to OnData, per connection
	s := start(t, f, sockfsm.Config{IdleTimeout: idle, LingerTimeout: clientDeadline},
		func(info sockfsm.ConnInfo) sockfsm.Handler {
			k := conntest.AddrKey(info.RemoteAddr)
			return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
				mu.Lock()
				handed[k] += len(p)
				mu.Unlock()
			})
		})
	for attempt := 1; ; attempt++ {
		c := dial(t, s.addr)
		paced := true
		last := time.Now()
		for i := range bytesSent {
			if i > 0 {
				time.Sleep(every) // pacing the client's input, not synchronization
			}
			if now := time.Now(); now.Sub(last) > idle/2 {
				paced = false
			}
			if _, err := c.Write([]byte{'x'}); err != nil {
				t.Fatalf("client write %d: %v (the server closed while input was arriving)", i+1, err)
			}
			last = time.Now()
		}
		if got := conntest.ReadToEOF(t, c); len(got) != 0 {
			t.Fatalf("client received %q, want nothing", got)
		}
		c.Close()
		info := s.closed(t, c)
		if !paced && attempt < 3 {
			t.Logf("attempt %d: the client was descheduled between two bytes; trying again", attempt)
			continue
		}
		mu.Lock()
		n := handed[conntest.Key(c)]
		mu.Unlock()
		if info.Reason != sockfsm.ReasonIdleTimeout || info.Aborted() || info.Err != nil {
			t.Errorf("CloseInfo %+v; want ReasonIdleTimeout, graceful", info)
		}
		if info.BytesRead != bytesSent || info.Discarded != 0 || n != bytesSent {
			t.Errorf("BytesRead = %d, Discarded = %d, handed to the handler %d; want %d, 0, %d: "+
				"the idle timeout fired while input was arriving", info.BytesRead, info.Discarded, n, bytesSent, bytesSent)
		}
		return
	}
}

// testLingerNoReset is golang/go#51109 on a raw socket: the handler answers
// and closes while the client is still sending. The server must linger,
// reading and discarding the client's input until its FIN, so that the
// kernel never answers unread input with an RST that would destroy the
// response in flight: the client reads the whole response and then EOF,
// never ECONNRESET, and its writes after the server's FIN succeed.
func testLingerNoReset(t *testing.T, f Factory) {
	resp := conntest.Pattern(0, 100<<10)
	s := start(t, f, sockfsm.Config{LingerTimeout: 5 * time.Second, LingerTime: 10 * time.Second},
		func(sockfsm.ConnInfo) sockfsm.Handler {
			answered := false
			return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
				if answered {
					return
				}
				answered = true
				c.Write(resp)
				c.Close()
			})
		})
	c := dial(t, s.addr)
	request := []byte("request")
	conntest.MustWrite(t, c, request)

	// The server has answered and is half-closing: keep sending, without
	// reading, so that input is pending at the server while the response
	// is pending here.
	s.waitEvent(t, c, fsm.HalfClose)
	chunk := bytes.Repeat([]byte("x"), 1<<10)
	const chunks = 20
	for i := range chunks {
		if _, err := c.Write(chunk); err != nil {
			t.Fatalf("client write %d after the server's half-close: %v", i, err)
		}
		time.Sleep(time.Millisecond) // pacing, so that an RST would be back before the next write
	}

	if got := conntest.ReadToEOF(t, c); !bytes.Equal(got, resp) {
		t.Fatalf("client received %d bytes, want the %d-byte response", len(got), len(resp))
	}
	// After the server's FIN for certain: writing still succeeds.
	for i := range 5 {
		if _, err := c.Write(chunk); err != nil {
			t.Fatalf("client write %d after reading the server's FIN: %v", i, err)
		}
		time.Sleep(time.Millisecond)
	}
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); len(got) != 0 {
		t.Fatalf("client received %d more bytes after EOF", len(got))
	}

	info := s.closed(t, c)
	sent := int64(len(request) + (chunks+5)*len(chunk))
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: sent, BytesWritten: int64(len(resp))})
	// Everything after the request was discarded (and possibly the end of
	// the request, if it arrived in pieces).
	if lo := int64((chunks + 5) * len(chunk)); info.Discarded < lo || info.Discarded > sent {
		t.Errorf("CloseInfo.Discarded = %d, want %d to %d", info.Discarded, lo, sent)
	}
}

// testLingerBounds: after the server's half-close (here on the idle
// timeout), a client that never sends its FIN cannot hold the connection:
// the linger ends on LingerTimeout if the client is silent, on LingerTime
// if it trickles, on LingerBytes if it floods, and the server's socket is
// closed.
func testLingerBounds(t *testing.T, f Factory) {
	// halfClosed starts a server with cfg and a client, and waits for the
	// server's FIN.
	halfClosed := func(t *testing.T, cfg sockfsm.Config) (*server, *net.TCPConn) {
		t.Helper()
		cfg.IdleTimeout = 100 * time.Millisecond
		s := start(t, f, cfg, conntest.Always(sockfsm.Echo{}))
		c := dial(t, s.addr)
		if got := conntest.ReadToEOF(t, c); len(got) != 0 {
			t.Fatalf("client received %q, want nothing", got)
		}
		return s, c
	}

	t.Run("Timeout", func(t *testing.T) {
		check(t)
		s, c := halfClosed(t, sockfsm.Config{LingerTimeout: 100 * time.Millisecond, LingerTime: time.Second})
		info := s.closed(t, c)
		conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonIdleTimeout, Linger: sockfsm.LingerEndTimeout, BytesRead: 0, BytesWritten: 0})
		// Nothing was left unread: the close is graceful, EOF again.
		if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("client read = %d, %v; want 0, io.EOF", n, err)
		}
		expectGone(t, c)
	})

	t.Run("Time", func(t *testing.T) {
		check(t)
		s, c := halfClosed(t, sockfsm.Config{LingerTimeout: 200 * time.Millisecond, LingerTime: 300 * time.Millisecond})
		// A byte every 20ms keeps each linger read well within
		// LingerTimeout; only LingerTime ends it. Bounded: about 5s.
		for range 250 {
			if _, closed := s.peekClosed(c); closed {
				break
			}
			if _, err := c.Write([]byte("x")); err != nil {
				break // the server has closed
			}
			time.Sleep(20 * time.Millisecond)
		}
		info := s.closed(t, c)
		conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonIdleTimeout, Linger: sockfsm.LingerEndTime, BytesRead: -1, BytesWritten: 0})
		if info.Discarded == 0 || info.Discarded != info.BytesRead {
			t.Errorf("CloseInfo.Discarded = %d, BytesRead = %d; want all of the trickle discarded", info.Discarded, info.BytesRead)
		}
		expectGone(t, c)
	})

	t.Run("Bytes", func(t *testing.T) {
		check(t)
		const limit = 4096
		s, c := halfClosed(t, sockfsm.Config{LingerTimeout: time.Second, LingerTime: 5 * time.Second, LingerBytes: limit})
		chunk := bytes.Repeat([]byte("x"), 1<<10)
		for range 1 << 10 { // at most 1 MiB
			if _, closed := s.peekClosed(c); closed {
				break
			}
			if _, err := c.Write(chunk); err != nil {
				break // the server has closed
			}
		}
		info := s.closed(t, c)
		conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonIdleTimeout, Linger: sockfsm.LingerEndBytes, BytesRead: -1, BytesWritten: 0})
		if info.Discarded < limit || info.Discarded != info.BytesRead {
			t.Errorf("CloseInfo.Discarded = %d, BytesRead = %d; want at least %d, all discarded", info.Discarded, info.BytesRead, limit)
		}
		expectGone(t, c)
	})
}

// testWriteTimeout: a client that never reads a big response is aborted
// after WriteTimeout: the server reports the write timeout, the client
// gets a reset, and other clients are served meanwhile.
func testWriteTimeout(t *testing.T, f Factory) {
	resp := conntest.Pattern(0, 16<<20) // far more than the loopback socket buffers hold
	s := start(t, f, sockfsm.Config{WriteTimeout: 200 * time.Millisecond, MaxPendingOutput: len(resp)}, conntest.Always(conntest.BigHandler(resp)))
	other := dial(t, s.addr)
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("big"))
	s.waitEvent(t, c, fsm.Output)

	// Another client is served while that one is stuck.
	echo(t, other, "hello")
	conntest.CloseWrite(t, other)
	if got := conntest.ReadToEOF(t, other); len(got) != 0 {
		t.Fatalf("other client received %q after its echo", got)
	}

	info := s.closed(t, c)
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonWriteTimeout, Linger: sockfsm.LingerEndNone, Aborted: true,
		Err: sockfsm.ErrWriteTimeout, BytesRead: 3, BytesWritten: -1})
	if info.BytesWritten >= int64(len(resp)) {
		t.Errorf("CloseInfo.BytesWritten = %d: the whole response was sent to a client that never read", info.BytesWritten)
	}
	t.Logf("sent %d bytes before the write timeout", info.BytesWritten)
	conntest.WantReset(t, c, resp)

	conntest.CheckInfo(t, s.closed(t, other), conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true, BytesRead: 5, BytesWritten: 5})
}

// testWriteTimeoutExcludesHandlerTime: the write deadline of a flush starts
// with the flush, so a handler that takes longer than WriteTimeout to
// compute its answer does not get its connection aborted before a byte is
// written to a client that reads promptly. (The goroutine driver once
// counted the deadline from the read that delivered the input.) A handler
// that sleeps stalls an event loop's other connections; there are none
// here.
func testWriteTimeoutExcludesHandlerTime(t *testing.T, f Factory) {
	s := start(t, f, sockfsm.Config{WriteTimeout: 200 * time.Millisecond},
		conntest.Always(sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
			c.Write([]byte("answer"))
			time.Sleep(300 * time.Millisecond) // computing something
		})))
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("question"))
	b := make([]byte, 6)
	if n, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("a client that reads at once got %q, %v (reset: %v); want %q", b[:n], err, conntest.IsReset(err), "answer")
	}
	conntest.CloseWrite(t, c)
	conntest.ReadToEOF(t, c)
	conntest.CheckInfo(t, s.closed(t, c), conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true, BytesRead: 8, BytesWritten: 6})
}

// halfCloser calls CloseWrite on its first input, after answering it, and
// then tries to write more. It records what happens.
type halfCloser struct {
	calls     int
	writeN    int   // what Write returned after CloseWrite
	writeErr  error // in the first call
	laterErrs []error
	later     []byte // input after the first call
	states    []fsm.State
}

const (
	halfAnswer = "answer, then FIN"
	halfLate   = "must not be sent"
)

func (h *halfCloser) OnData(c *sockfsm.Conn, p []byte) {
	h.calls++
	if h.calls == 1 {
		c.Write([]byte(halfAnswer))
		c.CloseWrite()
		h.writeN, h.writeErr = c.Write([]byte(halfLate))
		return
	}
	h.later = append(h.later, p...)
	h.states = append(h.states, c.State())
	_, err := c.Write([]byte(halfLate))
	h.laterErrs = append(h.laterErrs, err)
}

// testWriteAfterCloseWrite: after the handler's CloseWrite, its writes fail
// with ErrShutdown and send nothing (the client gets the answer and EOF
// only), while the client's further input is still handed to the handler
// until the client's FIN.
func testWriteAfterCloseWrite(t *testing.T, f Factory) {
	handlers := make(chan *halfCloser, 1)
	s := start(t, f, sockfsm.Config{LingerTimeout: 5 * time.Second},
		func(sockfsm.ConnInfo) sockfsm.Handler {
			h := &halfCloser{}
			handlers <- h
			return h
		})
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("one"))
	if got := conntest.ReadToEOF(t, c); string(got) != halfAnswer {
		t.Fatalf("client received %q, want %q and EOF", got, halfAnswer)
	}
	conntest.MustWrite(t, c, []byte("two"))
	conntest.MustWrite(t, c, []byte("three"))
	conntest.CloseWrite(t, c)
	if got := conntest.ReadToEOF(t, c); len(got) != 0 {
		t.Fatalf("client received %q after EOF", got)
	}

	info := s.closed(t, c) // Config.OnClose came after every OnData: h is final
	h := conntest.Recv(t, "the handler", handlers)
	if h.writeN != 0 || !errors.Is(h.writeErr, sockfsm.ErrShutdown) {
		t.Errorf("Write after CloseWrite = %d, %v; want 0, ErrShutdown", h.writeN, h.writeErr)
	}
	if string(h.later) != "twothree" {
		t.Errorf("input after CloseWrite handed to OnData: %q, want %q", h.later, "twothree")
	}
	for i, err := range h.laterErrs {
		if !errors.Is(err, sockfsm.ErrShutdown) {
			t.Errorf("Write in OnData call %d after CloseWrite: %v, want ErrShutdown", i+2, err)
		}
	}
	for _, st := range h.states {
		if st != fsm.HalfClosed {
			t.Errorf("state in OnData after CloseWrite = %s, want %s", st, fsm.HalfClosed)
		}
	}
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: int64(len("one") + len("twothree")), BytesWritten: int64(len(halfAnswer))})
	if info.Discarded != 0 {
		t.Errorf("CloseInfo.Discarded = %d, want 0: a half-close hands input to the handler", info.Discarded)
	}
}

// testMaxPendingOutputBoundary: MaxPendingOutput bytes fit, one more do
// not. A handler that writes exactly MaxPendingOutput bytes in one callback
// gets n = len, err = nil, and one more byte in the same callback gets 0,
// ErrOutputFull; a single Write of MaxPendingOutput+1 bytes queues
// MaxPendingOutput of them and returns ErrOutputFull. Either way the client
// receives exactly MaxPendingOutput bytes.
func testMaxPendingOutputBoundary(t *testing.T, f Factory) {
	const limit = 100_003 // not a power of two, nor a multiple of the read buffer
	type write struct {
		n   int
		err error
	}
	for _, tc := range []struct {
		name   string
		writes []int // the sizes written, in one callback
		want   []write
	}{
		{"ExactThenOne", []int{limit, 1}, []write{{limit, nil}, {0, sockfsm.ErrOutputFull}}},
		{"OneOver", []int{limit + 1}, []write{{limit, sockfsm.ErrOutputFull}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check(t)
			resp := conntest.Pattern(0, limit+1)
			results := make(chan []write, 1)
			s := start(t, f, sockfsm.Config{MaxPendingOutput: limit}, func(sockfsm.ConnInfo) sockfsm.Handler {
				done := false
				return sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
					if done {
						return
					}
					done = true
					var got []write
					off := 0
					for _, size := range tc.writes {
						n, err := c.Write(resp[off : off+size])
						got = append(got, write{n, err})
						off += n
					}
					results <- got
				})
			})
			c := dial(t, s.addr)
			conntest.MustWrite(t, c, []byte("go"))
			conntest.CloseWrite(t, c)
			got := conntest.ReadToEOF(t, c)
			ws := conntest.Recv(t, "the handler's writes", results)
			if len(ws) != len(tc.want) {
				t.Fatalf("writes %v, want %v", ws, tc.want)
			}
			for i, w := range ws {
				if w.n != tc.want[i].n || !errors.Is(w.err, tc.want[i].err) || (tc.want[i].err == nil && w.err != nil) {
					t.Errorf("Write %d of %d bytes = %d, %v; want %d, %v", i+1, tc.writes[i], w.n, w.err, tc.want[i].n, tc.want[i].err)
				}
			}
			if !bytes.Equal(got, resp[:limit]) {
				t.Errorf("client received %d bytes, want exactly the first MaxPendingOutput = %d", len(got), limit)
			}
			if info := s.closed(t, c); info.BytesWritten != limit || info.Aborted() {
				t.Errorf("CloseInfo %+v; want BytesWritten %d, graceful", info, limit)
			}
		})
	}
}

// testHandlerPanic: a handler's panic aborts its connection only: it is
// reported and logged with its value and stack, and the server goes on
// serving.
func testHandlerPanic(t *testing.T, f Factory) {
	const value = "kaboom: the handler's panic value"
	s := start(t, f, sockfsm.Config{}, conntest.Always(sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
		if bytes.Contains(p, []byte("boom")) {
			panic(value)
		}
		c.Write(p)
	})))
	c := dial(t, s.addr)
	conntest.MustWrite(t, c, []byte("boom"))
	n, err := conntest.Drain(c, []byte{})
	if !conntest.IsReset(err) && err != io.EOF {
		t.Errorf("client read after the panic: %v after %d bytes; want a reset or EOF", err, n)
	}
	info := s.closed(t, c)
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerPanic, Aborted: true, Err: sockfsm.ErrHandlerPanic, BytesRead: 4, BytesWritten: 0})
	var pe *sockfsm.PanicError
	if !errors.As(info.Err, &pe) || pe.Value != value {
		t.Errorf("CloseInfo.Err = %#v, want a *PanicError with value %q", info.Err, value)
	}

	conntest.WaitUntil(t, "the panic to be logged", func() bool { return strings.Contains(s.logs.String(), value) })
	if logs := s.logs.String(); !strings.Contains(logs, "goroutine") && !strings.Contains(logs, "panic(") {
		t.Errorf("the log has the panic's value but no stack:\n%s", logs)
	}

	exchange(t, s.addr, []byte("still serving"))
}
