package main

// The hub on a real sockfsm.Server over loopback TCP. No test asserts how
// long anything took; every socket has a deadline and every loop and wait is
// bounded, so that a bug fails a test instead of hanging it. The bounds are
// generous: they are there to end a hung test, and the machine may be busy
// (and a TCP sender whose peer stopped reading may take seconds to notice
// that it reads again).

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"go.uber.org/goleak"
)

// TestMain fails the run if a goroutine outlives the tests: the hub's, the
// server's and every connection's must have ended.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds each wait.
const deadline = 10 * time.Second

// connDeadline bounds a whole connection's I/O in a test.
const connDeadline = 60 * time.Second

// testServer is a sockfsm.Server running a Hub on 127.0.0.1.
type testServer struct {
	addr string
	hub  *Hub
	srv  *sockfsm.Server

	mu     sync.Mutex
	closes map[string]sockfsm.CloseInfo // by the client's address
}

// startHub starts a hub and a server for it; sndbuf, if positive, is the
// send buffer of the server's sockets, so that a client that does not read
// fills it quickly. The server is shut down and the hub closed when the
// test ends, after the test's clients are closed.
func startHub(t *testing.T, cfg sockfsm.Config, o Options, sndbuf int) *testServer {
	t.Helper()
	ts := &testServer{closes: map[string]sockfsm.CloseInfo{}}
	cfg.OnClose = func(c sockfsm.ConnInfo, info sockfsm.CloseInfo) {
		ts.mu.Lock()
		ts.closes[c.RemoteAddr.String()] = info
		ts.mu.Unlock()
	}
	ts.hub = NewHub(o)
	ts.srv = &sockfsm.Server{Config: cfg, NewHandler: ts.hub.NewHandler}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- ts.srv.Serve(sndbufListener{ln, sndbuf}) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := ts.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v, want ErrServerClosed", err)
		}
		ts.hub.Close()
	})
	return ts
}

// closeInfo returns how the server's end of c ended, once it has.
func (ts *testServer) closeInfo(t *testing.T, c net.Conn) sockfsm.CloseInfo {
	t.Helper()
	var info sockfsm.CloseInfo
	waitFor(t, "the server to close "+c.LocalAddr().String(), func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		var ok bool
		info, ok = ts.closes[c.LocalAddr().String()]
		return ok
	})
	return info
}

// sndbufListener sets the send buffer of the connections it accepts.
type sndbufListener struct {
	net.Listener
	sndbuf int
}

func (l sndbufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil && l.sndbuf > 0 {
		err = c.(*net.TCPConn).SetWriteBuffer(l.sndbuf)
		if err != nil {
			c.Close()
		}
	}
	return c, err
}

// dial connects a client, with a deadline on all its I/O; it is closed
// when the test ends.
func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(connDeadline)); err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// waitFor polls cond until it holds, for at most deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(deadline); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitSubscribers waits until the hub has n subscribers: lines published
// after that reach them all.
func waitSubscribers(t *testing.T, h *Hub, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d subscribers", n), func() bool { return h.Stats().Subscribers == n })
}

// readToEOF reads c until the server's FIN; an RST or any other error fails
// the test.
func readToEOF(t *testing.T, c net.Conn) []byte {
	t.Helper()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: read %v after %d bytes (reset: %v); want the server's FIN",
			c.LocalAddr(), err, len(b), errors.Is(err, syscall.ECONNRESET))
	}
	return b
}

// line returns the i-th line of a test, size bytes long.
func line(i, size int) []byte {
	l := fmt.Sprintf("line %06d ", i)
	return []byte(l + strings.Repeat("x", max(0, size-len(l)-1)) + "\n")
}

func lines(n, size int) [][]byte {
	ls := make([][]byte, n)
	for i := range ls {
		ls[i] = line(i, size)
	}
	return ls
}

// TestPublishReachesOthersInOrder: of three subscribers, one publishes;
// each of the two others receives exactly the published lines, in order,
// and nothing else (not even a line cut across two writes is changed), and
// the publisher receives nothing: each reads the server's FIN after its own.
func TestPublishReachesOthersInOrder(t *testing.T) {
	ts := startHub(t, sockfsm.Config{}, Options{MaxFull: DefaultMaxFull}, 0)
	pub, a, b := dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr)
	waitSubscribers(t, ts.hub, 3)

	const n = 200
	ls := lines(n, 40)
	want := bytes.Join(ls, nil)
	// Write in pieces that cut lines in two.
	for p := want; len(p) > 0; {
		k := min(len(p), 97)
		if _, err := pub.Write(p[:k]); err != nil {
			t.Fatal(err)
		}
		p = p[k:]
	}
	for _, c := range []net.Conn{a, b} {
		got := make([]byte, len(want))
		if k, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("%s: read %d of %d bytes: %v", c.LocalAddr(), k, len(want), err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s received other lines than the published ones", c.LocalAddr())
		}
	}
	// Each client half-closes: the server answers with its FIN, after
	// anything else it had for it; there must be nothing else.
	for _, c := range []*net.TCPConn{pub, a, b} {
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if extra := readToEOF(t, c); len(extra) > 0 {
			t.Errorf("%s received %d bytes more than the published lines: %.60q", c.LocalAddr(), len(extra), extra)
		}
	}
	st := ts.hub.Stats()
	if st.Published != n || st.Delivered != 2*n || st.Dropped != 0 || st.Pauses != 0 || st.Evicted != 0 {
		t.Errorf("Stats = %+v, want %d published, %d delivered, nothing dropped, paused or evicted", st, n, 2*n)
	}
}

// lineReader reads lines from c on a goroutine of its own, until c fails
// or the test ends.
func lineReader(t *testing.T, c net.Conn) <-chan []byte {
	ch := make(chan []byte, 16)
	ctx := t.Context()
	go func() {
		defer close(ch)
		r := bufio.NewReader(c)
		for {
			l, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			select {
			case ch <- l:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch
}

// TestSlowSubscriberIsDropped: one subscriber never reads while a publisher
// keeps going. The hub pauses it when its output is full, drops the
// messages that follow for it, and closes it once more than MaxFull were
// dropped in a row; the output held for it never exceeds
// MaxPendingOutput + MaxLine. It is closed gracefully: when it finally
// reads, it gets an exact prefix of the published stream, then the server's
// FIN, not a reset. The two subscribers that read receive every line, in
// order, before and after.
func TestSlowSubscriberIsDropped(t *testing.T) {
	const (
		maxPending = 8 << 10
		maxLine    = 1 << 10
		maxFull    = 10
		lineSize   = 200
		maxLines   = 20000 // bound: the slow subscriber's buffers hold far fewer
		after      = 20    // lines published after the eviction
	)
	type eviction struct {
		remote  string
		dropped int
	}
	evicted := make(chan eviction, 4)
	ts := startHub(t, sockfsm.Config{MaxPendingOutput: maxPending},
		Options{MaxFull: maxFull, MaxLine: maxLine, OnEvict: func(info sockfsm.ConnInfo, dropped int) {
			evicted <- eviction{info.RemoteAddr.String(), dropped}
		}}, 8<<10)

	pub, fast1, fast2, slow := dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr)
	if err := slow.SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	waitSubscribers(t, ts.hub, 4)
	readers := []<-chan []byte{lineReader(t, fast1), lineReader(t, fast2)}

	var ls [][]byte // the lines sent
	sent := 0
	evictedAt := -1
	for sent < maxLines && (evictedAt < 0 || sent < evictedAt+after) {
		ls = append(ls, line(sent, lineSize))
		if _, err := pub.Write(ls[sent]); err != nil {
			t.Fatalf("publisher: %v", err)
		}
		// Lockstep: the readers never fall behind, so only the slow
		// subscriber is ever paused.
		for i, r := range readers {
			select {
			case l, ok := <-r:
				if !ok {
					t.Fatalf("reader %d: connection ended after %d lines", i, sent)
				}
				if !bytes.Equal(l, ls[sent]) {
					t.Fatalf("reader %d: line %d is %.20q, want %.20q", i, sent, l, ls[sent])
				}
			case <-time.After(deadline):
				t.Fatalf("reader %d: line %d did not arrive", i, sent)
			}
		}
		sent++
		if evictedAt < 0 {
			select {
			case ev := <-evicted:
				if ev.remote != slow.LocalAddr().String() {
					t.Fatalf("evicted %s, want the slow subscriber %s", ev.remote, slow.LocalAddr())
				}
				if ev.dropped != maxFull+1 {
					t.Errorf("evicted after %d messages dropped in a row, want %d", ev.dropped, maxFull+1)
				}
				evictedAt = sent
			default:
			}
		}
	}
	if evictedAt < 0 {
		t.Fatalf("the slow subscriber was not closed after %d lines", sent)
	}

	st := ts.hub.Stats()
	if st.Evicted != 1 || st.Pauses < 1 || st.Dropped < maxFull+1 {
		t.Errorf("Stats = %+v, want 1 evicted, at least 1 pause and %d dropped", st, maxFull+1)
	}
	if st.MaxHeld > maxPending+maxLine {
		t.Errorf("the hub held up to %d bytes for a subscriber, want at most MaxPendingOutput + MaxLine = %d", st.MaxHeld, maxPending+maxLine)
	}
	if st.Subscribers != 3 {
		t.Errorf("%d subscribers after the eviction, want 3", st.Subscribers)
	}

	// The slow subscriber reads at last: whole lines in the order
	// published, with gaps where it was paused, perhaps the start of one
	// more (the line it was closed in the middle of), then the FIN.
	got := readToEOF(t, slow)
	if n := checkSubsequence(t, got, ls); n >= sent {
		t.Errorf("the slow subscriber received all %d lines: it was never behind", n)
	}
	slow.Close()
	if info := ts.closeInfo(t, slow); info.Aborted() || info.Reason != sockfsm.ReasonHandlerClose {
		t.Errorf("slow subscriber closed with %v (%v), want a graceful handler-close", info.Reason, info.Err)
	}
}

// TestPausedSubscriberResumes: a subscriber that stops reading for a while
// is paused and misses messages, but not more than MaxFull in a row; when it
// reads again, its OnDrain resumes it: the rest of the message it was paused
// in the middle of comes first, so it receives whole lines only, in order,
// with a gap, and then each new line again.
func TestPausedSubscriberResumes(t *testing.T) {
	const (
		maxPending = 8 << 10
		lineSize   = 200
		maxLines   = 20000 // bound
	)
	ts := startHub(t, sockfsm.Config{MaxPendingOutput: maxPending}, Options{MaxFull: maxLines, MaxLine: 1 << 10}, 8<<10)
	pub, fast, slow := dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr)
	if err := slow.SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	waitSubscribers(t, ts.hub, 3)
	fastLines := lineReader(t, fast)

	var ls [][]byte
	publish := func() {
		t.Helper()
		i := len(ls)
		ls = append(ls, line(i, lineSize))
		if _, err := pub.Write(ls[i]); err != nil {
			t.Fatalf("publisher: %v", err)
		}
		select {
		case l := <-fastLines:
			if !bytes.Equal(l, ls[i]) {
				t.Fatalf("line %d is %.20q, want %.20q", i, l, ls[i])
			}
		case <-time.After(deadline):
			t.Fatalf("line %d did not arrive", i)
		}
	}
	// Until the slow subscriber, which does not read, misses messages.
	for len(ls) < maxLines && ts.hub.Stats().Dropped == 0 {
		publish()
	}
	if ts.hub.Stats().Dropped == 0 {
		t.Fatalf("the slow subscriber missed nothing after %d lines", len(ls))
	}
	publish()
	publish()

	// It reads again: publish until it receives the last line published
	// (bounded in lines and in time).
	slowLines := lineReader(t, slow)
	var got [][]byte
	caughtUp := false
	for end := time.Now().Add(3 * deadline); len(ls) < maxLines && !caughtUp && time.Now().Before(end); {
		publish()
		for more := true; more && !caughtUp; {
			select {
			case l := <-slowLines:
				got = append(got, l)
				caughtUp = bytes.Equal(l, ls[len(ls)-1])
			case <-time.After(5 * time.Millisecond):
				more = false
			}
		}
	}
	if !caughtUp {
		t.Fatalf("the slow subscriber did not catch up after %d lines (received %d)", len(ls), len(got))
	}
	n := checkSubsequence(t, bytes.Join(got, nil), ls)
	if n != len(got) || n >= len(ls) {
		t.Errorf("the slow subscriber received %d whole lines of %d read, %d published: want whole lines only, with a gap", n, len(got), len(ls))
	}
	if st := ts.hub.Stats(); st.Evicted != 0 || st.Pauses < 1 || st.Subscribers != 3 {
		t.Errorf("Stats = %+v, want a pause and no eviction", st)
	}
}

// checkSubsequence checks that got is whole lines of ls, in order, perhaps
// with gaps, followed perhaps by the start of a later one; it returns the
// number of whole lines.
func checkSubsequence(t *testing.T, got []byte, ls [][]byte) int {
	t.Helper()
	if len(got) == 0 {
		t.Fatal("received nothing")
	}
	n, j := 0, 0
	for len(got) > 0 {
		for j < len(ls) && !bytes.HasPrefix(got, ls[j]) && !bytes.HasPrefix(ls[j], got) {
			j++
		}
		if j == len(ls) {
			t.Fatalf("after %d whole lines, received %.30q..., which is not the next published line", n, got)
		}
		if len(got) < len(ls[j]) {
			return n // the start of a line, last
		}
		got = got[len(ls[j]):]
		n++
		j++
	}
	return n
}

// TestShutdownClosesAllWithFIN: Server.Shutdown closes every subscriber
// gracefully: each reads the lines published before, then the server's FIN
// (not a reset); once they close, Shutdown returns nil, and every
// connection ended with ReasonShutdown after lingering until the client's
// FIN.
func TestShutdownClosesAllWithFIN(t *testing.T) {
	ts := startHub(t, sockfsm.Config{}, Options{MaxFull: DefaultMaxFull}, 0)
	cs := []*net.TCPConn{dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr)}
	waitSubscribers(t, ts.hub, len(cs))
	if _, err := cs[0].Write([]byte("last words\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the line to be delivered", func() bool { return ts.hub.Stats().Delivered == 2 })

	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		shut <- ts.srv.Shutdown(ctx)
	}()
	for i, c := range cs {
		want := "last words\n"
		if i == 0 {
			want = "" // the publisher does not hear itself
		}
		if got := string(readToEOF(t, c)); got != want {
			t.Errorf("client %d received %q before the FIN, want %q", i, got, want)
		}
		c.Close()
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown = %v, want nil: every connection closed gracefully", err)
		}
	case <-time.After(deadline):
		t.Fatal("Shutdown did not return")
	}
	for i, c := range cs {
		info := ts.closeInfo(t, c)
		if info.Reason != sockfsm.ReasonShutdown || info.Linger != sockfsm.LingerEndPeerFIN {
			t.Errorf("client %d: server side closed with %v, linger %v (%v); want shutdown, peer-fin", i, info.Reason, info.Linger, info.Err)
		}
	}
}

// TestRun runs the program: it serves on the address given, relays a line,
// and exits 0 after a signal.
func TestRun(t *testing.T) {
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	code := make(chan int, 1)
	var stderr testutil.SyncBuffer
	go func() { code <- run([]string{"-addr", "127.0.0.1:0", "-max-full", "3"}, &stderr, sigs, ready) }()
	var addr net.Addr
	select {
	case addr = <-ready:
	case c := <-code:
		t.Fatalf("run exited %d: %s", c, stderr.String())
	}
	a, b := dial(t, addr.String()), dial(t, addr.String())
	got := lineReader(t, b)
	// b may not be subscribed yet when a's first line arrives: send until
	// one gets through (bounded).
	received := false
	for i := 0; i < 200 && !received; i++ {
		if _, err := a.Write([]byte("hello\n")); err != nil {
			t.Fatal(err)
		}
		select {
		case l := <-got:
			if string(l) != "hello\n" {
				t.Fatalf("received %q, want %q", l, "hello\n")
			}
			received = true
		case <-time.After(50 * time.Millisecond):
		}
	}
	if !received {
		t.Fatal("no line was relayed")
	}
	sigs <- syscall.SIGTERM
	for _, c := range []net.Conn{a, b} {
		io.Copy(io.Discard, c) // until the server's FIN (or the deadline)
		c.Close()
	}
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("run exited %d after SIGTERM, want 0: %s", c, stderr.String())
		}
	case <-time.After(deadline):
		t.Fatal("run did not return after SIGTERM")
	}
	if !strings.Contains(stderr.String(), "stopped") {
		t.Errorf("log does not say the server stopped:\n%s", stderr.String())
	}
}
