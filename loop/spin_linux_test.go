package loop

// Bad input on real sockets: peers that flood without reading, trickle,
// reset in the middle of a write, half-close at once, or stop while we
// linger never make a loop spin. Each test counts the loop's turns (its
// epoll_waits, through a kernel that counts them) while the connection is
// stuck or gone: a loop that spins turns thousands of times a second; one
// that sleeps, a few. The window is a bound on how long the test looks,
// not a timing assertion.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// countingKernel is the epoll kernel, counting the loop's turns and the
// descriptors it registers.
type countingKernel struct {
	kernel
	waits atomic.Int64
	adds  atomic.Int64
}

func (k *countingKernel) wait(ev []unix.EpollEvent, block bool, until time.Time) (int, error) {
	k.waits.Add(1)
	return k.kernel.wait(ev, block, until)
}

func (k *countingKernel) ctl(op int, fd int32, events uint32) error {
	if op == unix.EPOLL_CTL_ADD {
		k.adds.Add(1)
	}
	return k.kernel.ctl(op, fd, events)
}

// countedServer starts a server whose loops count their turns. kernels
// returns the loops' kernels in the server's order: the accepting loop's
// first, then the serving loops'.
func countedServer(t *testing.T, loops int, cfg sockfsm.Config, h func(sockfsm.ConnInfo) sockfsm.Handler) (*testServer, func() []*countingKernel) {
	t.Helper()
	var mu sync.Mutex
	var ks []*countingKernel
	ts := &testServer{network: "tcp", rec: newRecorder(), served: make(chan struct{})}
	cfg.OnStateChange = ts.rec.onState
	cfg.OnClose = ts.rec.onClose
	cfg.Logger = testLogger(t)
	ts.srv = &Server{Config: cfg, NewHandler: h, Loops: loops}
	ts.srv.impl.newKernel = func() (kernel, error) {
		k, err := newEpollKernel()
		if err != nil {
			return nil, err
		}
		ck := &countingKernel{kernel: k}
		mu.Lock()
		ks = append(ks, ck)
		mu.Unlock()
		return ck, nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.addr = ln.Addr().String()
	go func() {
		ts.serveErr = ts.srv.Serve(ln)
		close(ts.served)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		ts.srv.Shutdown(ctx)
		ts.serveResult(t)
	})
	// The kernels are made when Serve starts its loops, which may be after
	// a client's dial returns (the listener's backlog accepts it): wait
	// for them, bounded.
	return ts, func() []*countingKernel {
		for end := time.Now().Add(clientDeadline); ; time.Sleep(time.Millisecond) {
			mu.Lock()
			got := ks
			mu.Unlock()
			if len(got) >= loops+1 || time.Now().After(end) {
				if len(got) < loops+1 {
					t.Fatalf("%d of %d loops started within %v", len(got), loops+1, clientDeadline)
				}
				return got
			}
		}
	}
}

// quietWindow is how long a test watches a loop that has nothing to do.
const quietWindow = 300 * time.Millisecond

// maxQuietTurns is how many turns a loop may take in quietWindow when
// nothing happens: a wake-up or two; a spinning loop takes thousands.
const maxQuietTurns = 5

// expectQuiet fails the test if the loop turns more than maxQuietTurns
// times in quietWindow.
func expectQuiet(t *testing.T, k *countingKernel, what string) {
	t.Helper()
	before := k.waits.Load()
	time.Sleep(quietWindow)
	if n := k.waits.Load() - before; n > maxQuietTurns {
		t.Errorf("%s: the loop turned %d times in %v with nothing to do: it spins", what, n, quietWindow)
	}
}

// TestNoSpinFloodWithoutReading: a peer sends and never reads; the echo
// fills its socket, the engine stops reading while it cannot flush, and
// the peer's own sends block. Nothing can progress until WriteTimeout, and
// the loop sleeps.
func TestNoSpinFloodWithoutReading(t *testing.T) {
	checkFDs(t)
	ts, kernels := countedServer(t, 1, sockfsm.Config{WriteTimeout: time.Minute, MaxPendingOutput: 1 << 20}, conntest.Always(sockfsm.Echo{}))
	c := ts.dial(t)
	chunk := bytes.Repeat([]byte("f"), 64<<10)
	// Send until the sends block: both directions are full.
	for range 1 << 12 { // at most 256 MiB
		c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Write(chunk); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("client write: %v", err)
			}
			break
		}
	}
	if !ts.rec.saw(conntest.Key(c), fsm.Output) {
		t.Fatal("the server never echoed")
	}
	expectQuiet(t, kernels()[1], "a peer that floods and does not read")
	expectQuiet(t, kernels()[0], "the accepting loop, with nothing to accept")
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	ts.rec.wait(t, conntest.Key(c))
}

// TestNoSpinTrickle: a peer sending a byte at a time costs the loop a few
// turns per byte, not more.
func TestNoSpinTrickle(t *testing.T) {
	checkFDs(t)
	ts, kernels := countedServer(t, 1, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	c := ts.dial(t)
	k := kernels()[1]
	before := k.waits.Load()
	const n = 50
	for range n {
		conntest.MustWrite(t, c, []byte("t"))
		conntest.ReadFull(t, c, 1)
		time.Sleep(2 * time.Millisecond)
	}
	if turns := k.waits.Load() - before; turns > 3*n+maxQuietTurns {
		t.Errorf("%d turns for %d one-byte exchanges, want at most %d", turns, n, 3*n+maxQuietTurns)
	}
	expectQuiet(t, k, "an idle connection after a trickle")
}

// TestNoSpinResetMidWrite: a peer resets while the server is writing to it
// (EPOLLOUT armed): the connection is aborted as the peer's reset and the
// loop sleeps.
func TestNoSpinResetMidWrite(t *testing.T) {
	checkFDs(t)
	resp := conntest.Pattern(0, 8<<20)
	ts, kernels := countedServer(t, 1, sockfsm.Config{MaxPendingOutput: len(resp), WriteTimeout: time.Minute}, conntest.Always(conntest.BigHandler(resp)))
	c := ts.dial(t)
	conntest.MustWrite(t, c, []byte("big"))
	conntest.ReadFull(t, c, 100<<10)
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	info := ts.rec.wait(t, conntest.Key(c))
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerReset, Aborted: true, Err: sockfsm.ErrPeerReset, BytesRead: 3, BytesWritten: -1})
	expectQuiet(t, kernels()[1], "after a reset in the middle of a write")
}

// TestNoSpinHalfCloseAtOnce: a peer that connects and half-closes at once,
// then neither reads nor closes: the server answers with its FIN and
// closes; the loop sleeps.
func TestNoSpinHalfCloseAtOnce(t *testing.T) {
	checkFDs(t)
	ts, kernels := countedServer(t, 1, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	c := ts.dial(t)
	conntest.CloseWrite(t, c)
	conntest.CheckInfo(t, ts.rec.wait(t, conntest.Key(c)), conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true, BytesRead: 0, BytesWritten: 0})
	expectQuiet(t, kernels()[1], "after a peer half-closed at once")
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("client read = %d, %v; want EOF", n, err)
	}
}

// TestNoSpinLingering: the server wrote more than the socket holds (so
// EPOLLOUT was armed), then closed; the peer read it all and neither
// sends nor closes. While the server lingers after its FIN, with a socket
// that Linux reports writable forever, the loop sleeps.
func TestNoSpinLingering(t *testing.T) {
	checkFDs(t)
	resp := conntest.Pattern(0, 4<<20)
	ts, kernels := countedServer(t, 1, sockfsm.Config{MaxPendingOutput: len(resp), LingerTimeout: time.Minute, LingerTime: time.Minute},
		conntest.Always(sockfsm.HandlerFunc(func(c *sockfsm.Conn, p []byte) {
			c.Write(resp)
			c.Close()
		})))
	c := ts.dial(t)
	conntest.MustWrite(t, c, []byte("go"))
	if got := conntest.ReadToEOF(t, c); !bytes.Equal(got, resp) {
		t.Fatalf("client read %d bytes, want the %d of the response", len(got), len(resp))
	}
	conntest.WaitUntil(t, "the server to linger", func() bool { return ts.rec.saw(conntest.Key(c), fsm.FINSent) })
	expectQuiet(t, kernels()[1], "lingering after our FIN")
	conntest.CloseWrite(t, c)
	conntest.CheckInfo(t, ts.rec.wait(t, conntest.Key(c)), conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: 2, BytesWritten: int64(len(resp))})
}

// TestConnectionsSpreadAcrossLoops: accepted connections are handed out to
// every serving loop, round-robin; the accepting loop serves none.
func TestConnectionsSpreadAcrossLoops(t *testing.T) {
	checkFDs(t)
	ts, kernels := countedServer(t, 4, sockfsm.Config{}, conntest.Always(sockfsm.Echo{}))
	const n = 40
	for range n {
		c := ts.dial(t)
		conntest.MustWrite(t, c, []byte("x"))
		conntest.ReadFull(t, c, 1)
	}
	ks := kernels()
	if got := ks[0].adds.Load(); got != 1 {
		t.Errorf("the accepting loop registered %d descriptors, want 1 (the listener)", got)
	}
	for i, k := range ks[1:] {
		if got := k.adds.Load(); got != n/4 {
			t.Errorf("serving loop %d registered %d descriptors, want %d connections", i, got, n/4)
		}
	}
}
