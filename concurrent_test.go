package sockfsm_test

// Real-socket tests of Conn used from goroutines other than the
// connection's own (run them under -race): concurrent writers racing the
// peer's half-close, the peer's reset and the server's shutdown; many
// connections pushed to and closed from outside; Conn.Do; PauseRead and
// ResumeRead; OnDrain.
//
// As in server_test.go: loopback only, every client socket has a deadline
// (clientDeadline), every wait is bounded and fails the test instead of
// hanging, and no test asserts how long anything took. Where a test checks
// that something does NOT happen (a paused connection reads nothing), it
// looks a few times over a bounded period: a bug shows as a failure, a slow
// machine only as a weaker check, never as a false failure.
//
// The helpers carry a cc prefix so as not to clash with the other test files
// of the package.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// ---- helpers ------------------------------------------------------------------

// ccHandler is a handler made of functions; a nil one does nothing. It
// implements every optional handler interface.
type ccHandler struct {
	open  func(c *sockfsm.Conn)
	data  func(c *sockfsm.Conn, p []byte)
	drain func(c *sockfsm.Conn)
	close func(c *sockfsm.Conn, info sockfsm.CloseInfo)
}

func (h *ccHandler) OnOpen(c *sockfsm.Conn) {
	if h.open != nil {
		h.open(c)
	}
}

func (h *ccHandler) OnData(c *sockfsm.Conn, p []byte) {
	if h.data != nil {
		h.data(c, p)
	}
}

func (h *ccHandler) OnDrain(c *sockfsm.Conn) {
	if h.drain != nil {
		h.drain(c)
	}
}

func (h *ccHandler) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	if h.close != nil {
		h.close(c, info)
	}
}

// ccOneConn is the handler of a test with one connection: it hands the Conn
// and the connection goroutine's id out of OnOpen, and counts OnClose.
type ccOneConn struct {
	ccHandler
	opened chan *sockfsm.Conn     // OnOpen's Conn
	infos  chan sockfsm.CloseInfo // OnClose's CloseInfo, each time
	closes atomic.Int32           // OnClose calls
	closed atomic.Bool            // OnClose has started
	gid    atomic.Uint64          // the goroutine OnOpen ran on
}

func newCCOneConn() *ccOneConn {
	h := &ccOneConn{opened: make(chan *sockfsm.Conn, 1), infos: make(chan sockfsm.CloseInfo, 4)}
	h.ccHandler.open = func(c *sockfsm.Conn) {
		h.gid.Store(ccGoID())
		h.opened <- c
	}
	return h
}

func (h *ccOneConn) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	h.closed.Store(true)
	h.closes.Add(1)
	h.ccHandler.OnClose(c, info)
	select {
	case h.infos <- info:
	default:
	}
}

// ccGoID returns the id of the calling goroutine, from the header line of
// its stack trace ("goroutine 123 [running]:").
func ccGoID() uint64 {
	var buf [64]byte
	n := runtime.Stack(buf[:], false)
	f := strings.Fields(string(buf[:n]))
	if len(f) < 2 {
		return 0
	}
	id, _ := strconv.ParseUint(f[1], 10, 64)
	return id
}

// ccWait waits for wg, bounded by clientDeadline.
func ccWait(t *testing.T, what string, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	conntest.Recv(t, what, done)
}

// ccListener passes every connection it accepts through accept (which may
// tune its socket buffers, or wrap it) before the server sees it.
type ccListener struct {
	net.Listener
	accept func(*net.TCPConn) net.Conn
}

func (l *ccListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok && err == nil && l.accept != nil {
		return l.accept(tc), nil
	}
	return c, err
}

// ccTune returns an accept function that calls tune on the socket.
func ccTune(tune func(*net.TCPConn)) func(*net.TCPConn) net.Conn {
	return func(c *net.TCPConn) net.Conn {
		tune(c)
		return c
	}
}

// ccHookConn is a server socket that calls onClose when the server closes
// or aborts it (transport.Wrap serves it through its generic adapter, whose
// Abort sets SO_LINGER 0 and calls Close).
type ccHookConn struct {
	*net.TCPConn
	onClose func()
}

func (c *ccHookConn) Close() error {
	c.onClose()
	return c.TCPConn.Close()
}

// ccServer is a Server on 127.0.0.1:0.
type ccServer struct {
	srv    *sockfsm.Server
	addr   string
	served chan error
}

// ccStart serves newHandler's handlers with cfg; accept, if not nil, is
// given each accepted socket and returns what to serve. When the test ends (after its clients are closed)
// the server is shut down: Shutdown must return nil, Serve ErrServerClosed,
// and NumConns 0.
func ccStart(t *testing.T, cfg sockfsm.Config, accept func(*net.TCPConn) net.Conn, newHandler func(sockfsm.ConnInfo) sockfsm.Handler) *ccServer {
	t.Helper()
	logs := newTestWriter(t)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	s := &ccServer{srv: &sockfsm.Server{Config: cfg, NewHandler: newHandler}, served: make(chan error, 1)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	s.addr = ln.Addr().String()
	go func() { s.served <- s.srv.Serve(&ccListener{ln, accept}) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown at the end of the test: %v", err)
		}
		select {
		case err := <-s.served:
			if !errors.Is(err, sockfsm.ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		case <-time.After(clientDeadline):
			t.Errorf("Serve did not return after Shutdown")
		}
		if n := s.srv.NumConns(); n != 0 {
			t.Errorf("NumConns after Shutdown = %d, want 0", n)
		}
	})
	return s
}

// waitNoConns waits (bounded) for the server to have no connection left.
func (s *ccServer) waitNoConns(t *testing.T) {
	t.Helper()
	conntest.WaitUntil(t, "NumConns to reach 0", func() bool { return s.srv.NumConns() == 0 })
}

// ccPattern returns n bytes that differ from one offset to the next, seeded
// so that two connections' streams differ too.
func ccPattern(seed, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(seed*7 + i%251)
	}
	return p
}

// ccRecords parses a stream of records "<tag><id>:<seq>\n" written by
// several goroutines. It returns, for each id, the sequence numbers in the
// order they arrived. A trailing piece without its newline is an error
// unless partialOK (the reader stopped in the middle of the stream).
func ccRecords(t *testing.T, data []byte, tag string, ids int, partialOK bool) [][]int {
	t.Helper()
	if i := bytes.LastIndexByte(data, '\n'); i+1 != len(data) {
		if !partialOK {
			t.Fatalf("the stream ends with a partial record %q", data[i+1:])
		}
		data = data[:i+1]
	}
	seqs := make([][]int, ids)
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		if line == "" && len(data) == 0 {
			break
		}
		id, seq, ok := strings.Cut(strings.TrimPrefix(line, tag), ":")
		g, err1 := strconv.Atoi(id)
		n, err2 := strconv.Atoi(seq)
		if !strings.HasPrefix(line, tag) || !ok || err1 != nil || err2 != nil || g < 0 || g >= ids {
			t.Fatalf("malformed record %q: records were cut or interleaved below record granularity", line)
		}
		seqs[g] = append(seqs[g], n)
	}
	return seqs
}

// ccCheckSeqs checks that id g's records arrived as 0, 1, ..., n-1: each
// once, in order, none missing; n is want[g], or at most want[g] if prefix.
func ccCheckSeqs(t *testing.T, seqs [][]int, want []int, prefix bool) {
	t.Helper()
	for g, s := range seqs {
		for i, n := range s {
			if n != i {
				t.Fatalf("writer %d: record %d arrived as the %dth of its records: lost, repeated or reordered", g, n, i)
			}
		}
		if prefix && len(s) > want[g] || !prefix && len(s) != want[g] {
			t.Fatalf("writer %d: %d records arrived, %d Writes were accepted", g, len(s), want[g])
		}
	}
}

// ---- 1a: concurrent writers against the close -----------------------------------

// TestConcurrentWritersRaceClose: eight goroutines write whole records
// "g<id>:<seq>\n" to one connection's Conn, from outside the callbacks,
// while the peer half-closes, the peer resets, or the server shuts down.
// Every Write queues its whole record (n == len, nil) or nothing
// (ErrShutdown; MaxPendingOutput is far above what the writers can queue,
// so ErrOutputFull cannot occur). Every accepted record arrives whole, once,
// in its writer's order, followed by the server's FIN, except after the
// peer's reset, where what arrived before it is a prefix of that. OnClose
// runs once and the server ends with no connection.
func TestConcurrentWritersRaceClose(t *testing.T) {
	const (
		writers    = 8
		maxRecords = 20000 // per writer: a bound; the close stops them first
		trigger    = 256   // records the client reads before it acts
	)
	for _, mode := range []string{"PeerHalfClose", "PeerReset", "Shutdown"} {
		t.Run(mode, func(t *testing.T) {
			checkFDs(t)
			h := newCCOneConn()
			cfg := sockfsm.Config{MaxPendingOutput: 64 << 20, LingerTimeout: clientDeadline, LingerTime: 2 * clientDeadline}
			s := ccStart(t, cfg, nil, func(sockfsm.ConnInfo) sockfsm.Handler { return h })
			c := dial(t, "tcp", s.addr).(*net.TCPConn)
			conn := conntest.Recv(t, "OnOpen", h.opened)

			accepted := make([]int, writers)
			refused := make([]bool, writers)
			var wg sync.WaitGroup
			for g := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for seq := range maxRecords {
						rec := fmt.Appendf(nil, "g%d:%d\n", g, seq)
						n, err := conn.Write(rec)
						if err != nil {
							if n != 0 || !errors.Is(err, sockfsm.ErrShutdown) {
								t.Errorf("writer %d, record %d: Write = %d, %v; want %d, nil or 0, ErrShutdown", g, seq, n, err, len(rec))
							}
							refused[g] = true
							return
						}
						if n != len(rec) {
							t.Errorf("writer %d, record %d: Write = %d, nil; want %d", g, seq, n, len(rec))
							return
						}
						accepted[g] = seq + 1
					}
				}()
			}

			ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
			defer cancel()
			shut := make(chan error, 1)
			var got []byte
			var readErr error
			buf := make([]byte, 64<<10)
			lines := 0
		read:
			for {
				n, err := c.Read(buf)
				got = append(got, buf[:n]...)
				lines += bytes.Count(buf[:n], []byte("\n"))
				if err != nil {
					readErr = err
					break
				}
				if lines >= trigger && lines-bytes.Count(buf[:n], []byte("\n")) < trigger {
					switch mode {
					case "PeerHalfClose":
						conntest.CloseWrite(t, c)
					case "PeerReset":
						if err := c.SetLinger(0); err != nil {
							t.Fatal(err)
						}
						c.Close()
						break read
					case "Shutdown":
						go func() { shut <- s.srv.Shutdown(ctx) }()
					}
				}
			}
			if mode != "PeerReset" {
				if readErr != io.EOF {
					t.Fatalf("client read: %v (reset: %v) after %d bytes; want the server's FIN (io.EOF)", readErr, conntest.IsReset(readErr), len(got))
				}
				c.Close() // our FIN: the server's linger ends
			}
			ccWait(t, "the writers", &wg)
			if t.Failed() {
				t.FailNow()
			}
			if lines < trigger {
				t.Fatalf("the client read only %d records before %v", lines, readErr)
			}

			seqs := ccRecords(t, got, "g", writers, mode == "PeerReset")
			ccCheckSeqs(t, seqs, accepted, mode == "PeerReset")

			info := conntest.Recv(t, "OnClose", h.infos)
			switch mode {
			case "PeerHalfClose":
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true, BytesRead: 0, BytesWritten: int64(len(got))})
			case "PeerReset":
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerReset, Aborted: true, Err: sockfsm.ErrPeerReset, BytesRead: 0, BytesWritten: -1})
			case "Shutdown":
				if err := conntest.Recv(t, "Shutdown to return", shut); err != nil {
					t.Fatalf("Shutdown = %v, want nil", err)
				}
				if n := s.srv.NumConns(); n != 0 {
					t.Fatalf("NumConns after Shutdown returned = %d, want 0", n)
				}
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonShutdown, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
					BytesRead: 0, BytesWritten: int64(len(got))})
			}
			s.waitNoConns(t)
			if n := h.closes.Load(); n != 1 {
				t.Fatalf("OnClose called %d times, want 1", n)
			}
			if n, err := conn.Write([]byte("late\n")); n != 0 || !errors.Is(err, sockfsm.ErrShutdown) {
				t.Errorf("Write after OnClose = %d, %v; want 0, ErrShutdown", n, err)
			}
			nrefused := 0
			for _, r := range refused {
				if r {
					nrefused++
				}
			}
			t.Logf("accepted per writer %v; %d writers were refused with ErrShutdown; %d bytes read", accepted, nrefused, len(got))
		})
	}
}

// ---- 1b: many connections pushed to and closed from outside ---------------------

// TestConcurrentPushThenCloseManyConns is the black-box check of Conn's
// promise to other goroutines: 200 idle connections; other goroutines push
// data to each (Conn.Write: 0 to 24 KiB, so that some closes have nothing to
// flush and must wake the idle connection themselves) and then close each
// (Conn.Close). Every client reads every byte, then the server's FIN (a read
// error other than io.EOF fails), and every connection reports a graceful
// close by the handler.
func TestConcurrentPushThenCloseManyConns(t *testing.T) {
	const (
		conns   = 200
		chunk   = 4 << 10
		pushers = 8
	)
	size := func(i int) int { return i % 4 * 8 << 10 }
	checkFDs(t)
	type opened struct {
		key string
		c   *sockfsm.Conn
	}
	openCh := make(chan opened, conns)
	closedCh := make(chan struct{}, 2*conns)
	var mu sync.Mutex
	infos := map[string][]sockfsm.CloseInfo{}
	s := ccStart(t, sockfsm.Config{LingerTimeout: clientDeadline, LingerTime: 2 * clientDeadline}, nil,
		func(sockfsm.ConnInfo) sockfsm.Handler {
			return &ccHandler{
				open: func(c *sockfsm.Conn) { openCh <- opened{c.Info().RemoteAddr.String(), c} },
				data: func(c *sockfsm.Conn, p []byte) { t.Errorf("the server received %q from an idle client", p) },
				close: func(c *sockfsm.Conn, info sockfsm.CloseInfo) {
					mu.Lock()
					k := c.Info().RemoteAddr.String()
					infos[k] = append(infos[k], info)
					mu.Unlock()
					closedCh <- struct{}{}
				},
			}
		})

	clients := make([]net.Conn, conns)
	for i := range clients {
		clients[i] = dial(t, "tcp", s.addr)
	}
	server := map[string]*sockfsm.Conn{}
	for range conns {
		o := conntest.Recv(t, "the server to open every connection", openCh)
		server[o.key] = o.c
	}

	type result struct {
		i    int
		data []byte
		err  error
	}
	results := make(chan result, conns)
	for i, c := range clients {
		go func() {
			b, err := io.ReadAll(c)
			results <- result{i, b, err}
		}()
	}

	work := make(chan int, conns)
	for i := range conns {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	for range pushers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				sc := server[conntest.Key(clients[i])]
				if sc == nil {
					t.Errorf("client %d: no server connection from %s", i, conntest.Key(clients[i]))
					continue
				}
				p := ccPattern(i, size(i))
				for off := 0; off < len(p); off += chunk {
					if n, err := sc.Write(p[off : off+chunk]); n != chunk || err != nil {
						t.Errorf("client %d: Write at %d = %d, %v; want %d, nil", i, off, n, err, chunk)
					}
				}
				if err := sc.Close(); err != nil {
					t.Errorf("client %d: Conn.Close = %v", i, err)
				}
				if n, err := sc.Write([]byte("late")); n != 0 || !errors.Is(err, sockfsm.ErrShutdown) {
					t.Errorf("client %d: Write after Conn.Close = %d, %v; want 0, ErrShutdown", i, n, err)
				}
			}
		}()
	}
	ccWait(t, "the pushers", &wg)

	for range conns {
		r := conntest.Recv(t, "the clients to read to EOF", results)
		if r.err != nil {
			t.Errorf("client %d: read: %v (reset: %v) after %d bytes; want the server's FIN (io.EOF)", r.i, r.err, conntest.IsReset(r.err), len(r.data))
		} else if !bytes.Equal(r.data, ccPattern(r.i, size(r.i))) {
			t.Errorf("client %d: received %d bytes, not the %d pushed", r.i, len(r.data), size(r.i))
		}
		clients[r.i].Close() // our FIN: the server's linger ends
	}
	for range conns {
		conntest.Recv(t, "OnClose of every connection", closedCh)
	}
	s.waitNoConns(t)
	mu.Lock()
	defer mu.Unlock()
	for i, c := range clients {
		is := infos[conntest.Key(c)]
		if len(is) != 1 {
			t.Errorf("client %d: OnClose called %d times, want 1", i, len(is))
			continue
		}
		conntest.CheckInfo(t, is[0], conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
			BytesRead: 0, BytesWritten: int64(size(i))})
		if t.Failed() {
			t.Fatalf("client %d", i)
		}
	}
}

// ---- 1c: Conn.Do ------------------------------------------------------------------

// TestConcurrentDoOrderAndGoroutine: f given to Conn.Do from another
// goroutine runs on the connection's goroutine (the one OnOpen ran on), once,
// and may Write: its record comes after every record that goroutine wrote
// before calling Do, the Do functions run in the order of the calls, and a
// Write made after f has run comes after f's.
func TestConcurrentDoOrderAndGoroutine(t *testing.T) {
	const n = 500
	checkFDs(t)
	h := newCCOneConn()
	s := ccStart(t, sockfsm.Config{LingerTimeout: clientDeadline, LingerTime: 2 * clientDeadline}, nil,
		func(sockfsm.ConnInfo) sockfsm.Handler { return h })
	c := dial(t, "tcp", s.addr)
	conn := conntest.Recv(t, "OnOpen", h.opened)
	connG := h.gid.Load()
	if connG == 0 || connG == ccGoID() {
		t.Fatalf("OnOpen ran on goroutine %d; the test runs on %d", connG, ccGoID())
	}

	var ran [n]atomic.Int32
	var wrongG atomic.Int32
	write := func(rec string) {
		t.Helper()
		if m, err := conn.Write([]byte(rec)); m != len(rec) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", rec, m, err)
		}
	}
	for i := range n {
		write(fmt.Sprintf("a%d\n", i))
		err := conn.Do(func(c *sockfsm.Conn) {
			ran[i].Add(1)
			if ccGoID() != connG {
				wrongG.Add(1)
			}
			if m, err := c.Write(fmt.Appendf(nil, "b%d\n", i)); err != nil || m == 0 {
				t.Errorf("Write from Do %d: %d, %v", i, m, err)
			}
		})
		if err != nil {
			t.Fatalf("Do %d = %v", i, err)
		}
	}
	// Once f has run, a Write comes after f's.
	write("x\n")
	done := make(chan struct{})
	if err := conn.Do(func(c *sockfsm.Conn) { c.Write([]byte("y\n")); close(done) }); err != nil {
		t.Fatal(err)
	}
	conntest.Recv(t, "the Do function to run", done)
	write("z\n")
	if err := conn.Do(func(c *sockfsm.Conn) {
		if err := c.Close(); err != nil {
			t.Errorf("Close from Do: %v", err)
		}
	}); err != nil {
		t.Fatal(err)
	}

	got := conntest.ReadToEOF(t, c)
	c.Close()
	conntest.CheckInfo(t, conntest.Recv(t, "OnClose", h.infos), conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN,
		PeerFIN: true, BytesRead: 0, BytesWritten: int64(len(got))})

	lines := strings.Split(strings.TrimSuffix(string(got), "\n"), "\n")
	pos := map[string]int{}
	for i, l := range lines {
		if _, dup := pos[l]; dup {
			t.Fatalf("record %q arrived twice", l)
		}
		pos[l] = i
	}
	if len(lines) != 2*n+3 {
		t.Fatalf("%d records arrived, want %d", len(lines), 2*n+3)
	}
	for i := range n {
		a, okA := pos[fmt.Sprintf("a%d", i)]
		b, okB := pos[fmt.Sprintf("b%d", i)]
		if !okA || !okB {
			t.Fatalf("record a%d or b%d is missing", i, i)
		}
		if b < a {
			t.Fatalf("Do %d's record arrived before the Write made before Do was called", i)
		}
		if i > 0 && (a < pos[fmt.Sprintf("a%d", i-1)] || b < pos[fmt.Sprintf("b%d", i-1)]) {
			t.Fatalf("records of iteration %d arrived before those of iteration %d", i, i-1)
		}
		if r := ran[i].Load(); r != 1 {
			t.Fatalf("Do %d's function ran %d times, want 1", i, r)
		}
	}
	if !(pos["x"] < pos["y"] && pos["y"] < pos["z"]) {
		t.Fatalf("x, y, z arrived at %d, %d, %d: want in that order", pos["x"], pos["y"], pos["z"])
	}
	if w := wrongG.Load(); w != 0 {
		t.Fatalf("%d Do functions ran on a goroutine other than the connection's", w)
	}
	s.waitNoConns(t)
	if n := h.closes.Load(); n != 1 {
		t.Fatalf("OnClose called %d times", n)
	}
}

// ccDoCall is one call of Conn.Do and what became of its function.
type ccDoCall struct {
	err        error        // what Do returned
	ran        atomic.Int32 // how many times f ran
	afterClose atomic.Bool  // f ran after OnClose had started
	wrongG     atomic.Bool  // f ran on another goroutine than the connection's
	refused    atomic.Bool  // f's Write was refused: it ran while the close was under way
}

// fn returns the function of the call: it records that it ran, where and
// when, and writes a record.
func (dc *ccDoCall) fn(h *ccOneConn) func(*sockfsm.Conn) {
	return func(c *sockfsm.Conn) {
		dc.ran.Add(1)
		dc.afterClose.Store(h.closed.Load())
		dc.wrongG.Store(ccGoID() != h.gid.Load())
		if _, err := c.Write([]byte("d\n")); err != nil { // ErrShutdown once the close is under way
			dc.refused.Store(true)
		}
	}
}

// TestConcurrentDoExactlyOnce: goroutines call Conn.Do in a loop while the
// connection closes (Conn.Close from yet another goroutine, or the peer's
// reset). Every function whose Do returned nil runs exactly once, on the
// connection's goroutine, before OnClose; every Do that returned an error
// returned ErrClosed, and its function never runs; and the loops end,
// because Do returns ErrClosed once OnClose ran. One more Do is called for
// certain while the server closes the socket (from a hook in its Close):
// its function too runs, before OnClose.
//
// The callers pause briefly between calls. Without that pause they starve
// the connection: the engine runs the functions queued by Do in the step
// that finds them, and keeps running the ones queued meanwhile, so callers
// that queue faster than the functions run keep the driver in one step, and
// it performs no I/O, takes no timer and no abort (a bug, reported with a
// reproduction).
func TestConcurrentDoExactlyOnce(t *testing.T) {
	const (
		callers  = 4
		maxCalls = 200000 // per caller: a bound; ErrClosed stops them first
		trigger  = 100
		pace     = 50 * time.Microsecond
	)
	for _, mode := range []string{"ConnClose", "PeerReset"} {
		t.Run(mode, func(t *testing.T) {
			checkFDs(t)
			h := newCCOneConn()
			var hooked atomic.Pointer[sockfsm.Conn]
			var atClose []*ccDoCall // the connection's goroutine, until OnClose
			hook := func() {
				conn := hooked.Load()
				if conn == nil {
					return
				}
				dc := &ccDoCall{}
				atClose = append(atClose, dc)
				done := make(chan struct{})
				go func() {
					dc.err = conn.Do(dc.fn(h))
					close(done)
				}()
				select {
				case <-done:
				case <-time.After(clientDeadline):
					t.Errorf("Do blocked while the server closed the socket")
				}
			}
			s := ccStart(t, sockfsm.Config{LingerTimeout: clientDeadline, LingerTime: 2 * clientDeadline},
				func(c *net.TCPConn) net.Conn { return &ccHookConn{c, hook} },
				func(sockfsm.ConnInfo) sockfsm.Handler { return h })
			c := dial(t, "tcp", s.addr).(*net.TCPConn)
			conn := conntest.Recv(t, "OnOpen", h.opened)
			hooked.Store(conn)

			calls := make([][]*ccDoCall, callers)
			var wg sync.WaitGroup
			for g := range callers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range maxCalls {
						dc := &ccDoCall{}
						calls[g] = append(calls[g], dc)
						dc.err = conn.Do(dc.fn(h))
						if dc.err != nil {
							return
						}
						// Pacing, not synchronization: see the comment above.
						time.Sleep(pace)
					}
				}()
			}

			// Read; once some of the functions' output is in, close.
			buf := make([]byte, 64<<10)
			lines := 0
			for {
				n, err := c.Read(buf)
				lines += bytes.Count(buf[:n], []byte("\n"))
				if err != nil {
					t.Fatalf("client read: %v after %d records", err, lines)
				}
				if lines >= trigger {
					break
				}
			}
			switch mode {
			case "ConnClose":
				closing := make(chan error, 1)
				go func() { closing <- conn.Close() }()
				if err := conntest.Recv(t, "Conn.Close", closing); err != nil {
					t.Fatalf("Conn.Close = %v", err)
				}
				if _, err := conntest.Drain(c, nil); err != io.EOF {
					t.Fatalf("client read: %v; want the server's FIN (io.EOF)", err)
				}
				c.Close()
			case "PeerReset":
				if err := c.SetLinger(0); err != nil {
					t.Fatal(err)
				}
				c.Close()
			}

			info := conntest.Recv(t, "OnClose", h.infos)
			ccWait(t, "the Do callers to get ErrClosed", &wg)
			s.waitNoConns(t) // the driver has returned: nothing more can run
			if mode == "ConnClose" {
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
					BytesRead: 0, BytesWritten: -1})
			} else {
				conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerReset, Aborted: true, Err: sockfsm.ErrPeerReset, BytesRead: 0, BytesWritten: -1})
			}
			if len(atClose) != 1 || atClose[0].err != nil {
				t.Fatalf("the server closed the socket %d times; Do called meanwhile: %v", len(atClose), atClose)
			}
			if n := atClose[0].ran.Load(); n != 1 || atClose[0].afterClose.Load() {
				t.Fatalf("the function of the Do called while the server closed the socket ran %d times (after OnClose: %v); want once, before",
					n, atClose[0].afterClose.Load())
			}
			late := &ccDoCall{}
			late.err = conn.Do(late.fn(h))
			calls = append(calls, []*ccDoCall{late})

			total, ranOK, refused := 0, 0, 0
			for g, cs := range calls {
				if last := cs[len(cs)-1]; last.err == nil {
					t.Errorf("caller %d: %d calls of Do, none returned ErrClosed", g, len(cs))
				}
				for i, dc := range cs {
					total++
					ran := dc.ran.Load()
					switch {
					case dc.err == nil && ran != 1:
						t.Fatalf("caller %d, call %d: Do returned nil and f ran %d times; want exactly once", g, i, ran)
					case dc.err != nil && !errors.Is(dc.err, sockfsm.ErrClosed):
						t.Fatalf("caller %d, call %d: Do = %v, want nil or ErrClosed", g, i, dc.err)
					case dc.err != nil && ran != 0:
						t.Fatalf("caller %d, call %d: Do returned %v and f ran %d times anyway", g, i, dc.err, ran)
					case dc.afterClose.Load():
						t.Fatalf("caller %d, call %d: f ran after OnClose", g, i)
					case dc.wrongG.Load():
						t.Fatalf("caller %d, call %d: f ran on another goroutine than the connection's", g, i)
					}
					if dc.err == nil {
						ranOK++
					}
					if dc.refused.Load() {
						refused++
					}
				}
			}
			if !errors.Is(late.err, sockfsm.ErrClosed) {
				t.Fatalf("Do after OnClose = %v, want ErrClosed", late.err)
			}
			if n := h.closes.Load(); n != 1 {
				t.Fatalf("OnClose called %d times, want 1", n)
			}
			t.Logf("%d calls of Do, %d ran, %d of them while the close was under way", total, ranOK, refused)
		})
	}
}

// ---- 1d: PauseRead and ResumeRead -------------------------------------------------

// TestConcurrentPauseResumeBackpressure: the handler pauses reading after
// the first chunk; the peer writes far more than the socket buffers hold.
// While paused the handler receives nothing more and the peer's writing is
// held back; ResumeRead (from another goroutine) delivers the rest intact.
// (That IdleTimeout does not run while paused is checked on the virtual
// clock, by TestBlindIdlePausedRead: here a short IdleTimeout would also
// fire on a loaded machine after the resume.)
func TestConcurrentPauseResumeBackpressure(t *testing.T) {
	const size = 4 << 20 // far more than the 32 KiB socket buffers set below hold
	checkFDs(t)
	payload := ccPattern(3, size)
	h := newCCOneConn()
	var got []byte // the connection's goroutine only, until OnClose
	var count atomic.Int64
	paused := make(chan struct{})
	h.data = func(c *sockfsm.Conn, p []byte) {
		got = append(got, p...)
		if count.Add(int64(len(p))) == int64(len(p)) {
			c.PauseRead()
			close(paused)
		}
	}
	const look = 50 * time.Millisecond
	s := ccStart(t, sockfsm.Config{}, ccTune(func(c *net.TCPConn) { c.SetReadBuffer(32 << 10) }),
		func(sockfsm.ConnInfo) sockfsm.Handler { return h })
	c := dial(t, "tcp", s.addr).(*net.TCPConn)
	if err := c.SetWriteBuffer(32 << 10); err != nil {
		t.Fatal(err)
	}
	conn := conntest.Recv(t, "OnOpen", h.opened)

	var written atomic.Int64
	wrote := make(chan error, 1)
	go func() {
		for off := 0; off < size; {
			n, err := c.Write(payload[off:min(off+64<<10, size)])
			off += n
			written.Add(int64(n))
			if err != nil {
				wrote <- err
				return
			}
		}
		wrote <- c.CloseWrite()
	}()

	conntest.Recv(t, "the handler to pause", paused)
	atPause := count.Load()
	// Look a few times over a while: nothing is read, nothing closes, and
	// the peer is held back.
	for i := range 6 {
		time.Sleep(look)
		if n := count.Load(); n != atPause {
			t.Fatalf("look %d: the handler received %d bytes while reading was paused (%d at the pause)", i, n, atPause)
		}
		if h.closed.Load() {
			t.Fatalf("look %d: the connection closed while reading was paused: %+v", i, conntest.Recv(t, "OnClose", h.infos))
		}
	}
	select {
	case err := <-wrote:
		t.Fatalf("the client wrote all %d bytes (%v) while the server was paused: no backpressure", size, err)
	default:
	}
	if w := written.Load(); w >= size {
		t.Fatalf("the client wrote %d bytes while the server was paused", w)
	}
	t.Logf("paused after %d bytes; the client had written %d when the server resumed", atPause, written.Load())

	resumed := make(chan struct{})
	go func() { conn.ResumeRead(); close(resumed) }()
	conntest.Recv(t, "ResumeRead", resumed)
	if err := conntest.Recv(t, "the client to write everything", wrote); err != nil {
		t.Fatalf("client write: %v after %d bytes", err, written.Load())
	}
	if b := conntest.ReadToEOF(t, c); len(b) != 0 {
		t.Fatalf("client received %d bytes", len(b))
	}
	info := conntest.Recv(t, "OnClose", h.infos)
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true, BytesRead: size, BytesWritten: 0})
	if !bytes.Equal(got, payload) {
		t.Fatalf("the handler received %d bytes, not the %d the client sent", len(got), size)
	}
}

// ---- 1e: OnDrain ----------------------------------------------------------------------

// TestConcurrentDrainHandler: a handler writes until ErrOutputFull (keeping
// the prefix Write queued), stops, and resumes in OnDrain, which comes only
// after an ErrOutputFull and with the queue empty; while the peer does not
// read, the handler cannot get everything out; once it reads, the drains go
// on and every byte arrives, in order, then the server's FIN.
func TestConcurrentDrainHandler(t *testing.T) {
	const (
		size    = 4 << 20
		maxOut  = 64 << 10
		chunk   = 20000 // not a divisor of maxOut: ErrOutputFull queues a prefix
		polling = 20 * time.Millisecond
	)
	checkFDs(t)
	data := ccPattern(5, size)
	h := newCCOneConn()
	var (
		off, fulls int  // the connection's goroutine only
		owed       bool // an ErrOutputFull has had no OnDrain yet
		started    bool
		problems   []string
		drains     atomic.Int32
		progress   atomic.Int64
	)
	fill := func(c *sockfsm.Conn) {
		for off < len(data) {
			want := min(chunk, len(data)-off)
			n, err := c.Write(data[off : off+want])
			if n < 0 || n > want {
				problems = append(problems, fmt.Sprintf("Write of %d bytes returned n = %d", want, n))
				return
			}
			off += n
			progress.Store(int64(off))
			switch {
			case err == nil && n != want:
				problems = append(problems, fmt.Sprintf("Write of %d bytes returned %d, nil", want, n))
				return
			case errors.Is(err, sockfsm.ErrOutputFull):
				fulls++
				owed = true
				if a, b := c.Available(), c.Buffered(); a != 0 || b != maxOut {
					problems = append(problems, fmt.Sprintf("after ErrOutputFull: Available %d, Buffered %d; want 0, %d", a, b, maxOut))
				}
				return
			case err != nil:
				problems = append(problems, fmt.Sprintf("Write: %v", err))
				return
			}
		}
		if err := c.Close(); err != nil {
			problems = append(problems, fmt.Sprintf("Close: %v", err))
		}
	}
	h.data = func(c *sockfsm.Conn, p []byte) {
		if !started {
			started = true
			fill(c)
		}
	}
	h.drain = func(c *sockfsm.Conn) {
		if !owed {
			problems = append(problems, "OnDrain without an ErrOutputFull before it")
		}
		if b := c.Buffered(); b != 0 {
			problems = append(problems, fmt.Sprintf("OnDrain with %d bytes still queued", b))
		}
		owed = false
		drains.Add(1)
		fill(c)
	}
	s := ccStart(t, sockfsm.Config{MaxPendingOutput: maxOut, LingerTimeout: clientDeadline, LingerTime: 2 * clientDeadline},
		ccTune(func(c *net.TCPConn) { c.SetWriteBuffer(32 << 10) }), func(sockfsm.ConnInfo) sockfsm.Handler { return h })
	c := dial(t, "tcp", s.addr).(*net.TCPConn)
	if err := c.SetReadBuffer(32 << 10); err != nil {
		t.Fatal(err)
	}
	conntest.MustWrite(t, c, []byte("go"))

	// Let the handler get as far as it can without the client reading:
	// until its progress stops for a few looks in a row (bounded).
	last, still := int64(-1), 0
	for range int(clientDeadline / polling) {
		time.Sleep(polling)
		if p := progress.Load(); p == last && p > 0 {
			if still++; still == 5 {
				break
			}
		} else {
			last, still = p, 0
		}
	}
	stalled, drainsStalled := progress.Load(), drains.Load()
	if stalled >= size {
		t.Fatalf("the handler queued all %d bytes while the client read nothing", size)
	}
	t.Logf("without the client reading, the handler got %d bytes out with %d drains", stalled, drainsStalled)

	got := conntest.ReadToEOF(t, c)
	c.Close()
	info := conntest.Recv(t, "OnClose", h.infos)
	if !bytes.Equal(got, data) {
		t.Fatalf("client received %d bytes, not the %d written", len(got), size)
	}
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonHandlerClose, Linger: sockfsm.LingerEndPeerFIN, PeerFIN: true,
		BytesRead: 2, BytesWritten: size})
	for _, p := range problems { // OnClose ran: the handler is done with them
		t.Error(p)
	}
	if d := drains.Load(); d <= drainsStalled || int(d) < size/maxOut-1 || int(d) != fulls {
		t.Fatalf("%d drains (%d before the client read), %d ErrOutputFull: want one drain per ErrOutputFull, at least %d, and more once the client read",
			d, drainsStalled, fulls, size/maxOut-1)
	}
}
