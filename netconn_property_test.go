package sockfsm

// Property tests of the net.Conn face (NetConn), in the issue's words: the
// application's Read/Write/Close calls as drawn events from several
// goroutines; no send after shutdown, every connection closed exactly
// once, every byte written before Close delivered.
//
// transport/sim runs everything on one goroutine, and NetConn's Read and
// Write block on a sync.Cond, so the face runs here over
// transport.PipeSize instead: real goroutines (the driver, one to three
// application goroutines, the peer's reader and sender), real but short
// time. rapid draws everything up front (the Config, the pipe's capacity,
// each application goroutine's script of calls, the peer's script); the
// goroutines then play it. The interleaving is the scheduler's: a seed
// replays the same scripts, not always the same interleaving, so a failing
// seed may need a few runs (-count=20) to fail again.
//
// Every wait is bounded: a case that does not finish within faceCaseBound
// fails (its goroutines are unstuck with aborts first), it never hangs.
// The Config's timeouts are far longer than that bound, so a case that
// needs one of them to finish fails too.
//
// go test -run TestPropertyNetConn -rapid.checks=1000 runs more cases.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/transport"
)

// faceCaseBound bounds one case, from its start to its last check.
const faceCaseBound = 5 * time.Second

// TestPropertyNetConn: whatever the application goroutines call, in any
// interleaving, and whatever the peer does (including a reset, and the
// application's Abort, or SetLinger(0) then Close):
//
//   - no send after shutdown: no Write reaches the transport after our FIN
//     or after its close, the peer reads EOF and then nothing, the engine
//     never sees a write error; a Write that starts after CloseWrite or
//     Close returned queues nothing;
//   - every connection closed exactly once: the transport closed once and
//     the driver's run returned, Config.OnClose called once with what run
//     returned (and NetConn.CloseInfo agrees), the server's pipe end closed
//     (the peer reads EOF or ECONNRESET), only table edges, ending in
//     closed; at most one Close returns nil (exactly one without Abort);
//   - a Read, Write, CloseWrite, SetReadDeadline, SetWriteDeadline,
//     SetDeadline or Close that starts after Close (or Abort) returned fails
//     with net.ErrClosed;
//   - what the peer received is a prefix of the Writes' bytes, each Write's
//     n bytes contiguous and in per-goroutine order; what the application
//     read is a prefix of the peer's input, each goroutine's reads in
//     order, no byte twice; a Read that returned io.EOF means everything
//     the peer sent was read.
func TestPropertyNetConn(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) { faceCheckCommon(rt, faceRun(rt, true)) })
}

// TestPropertyNetConnGraceful: with no Abort and a well-behaved peer (it
// reads until EOF, never resets), on top of TestPropertyNetConn's
// properties, every byte of every Write (all n it returned, so all of a
// Write that returned nil) is delivered to the peer, in per-goroutine order,
// followed by EOF and no reset; the close is the handler's, graceful, after
// the peer's FIN.
func TestPropertyNetConnGraceful(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		w := faceRun(rt, false)
		faceCheckCommon(rt, w)
		faceCheckGraceful(rt, w)
	})
}

// faceStream is the server's end of the pipe, counting what the driver
// does to it.
type faceStream struct {
	transport.Stream

	mu               sync.Mutex
	closes           int // Close and Abort
	aborts           int
	closeWrites      int
	finSent          bool // CloseWrite returned nil
	closed           bool
	writesAfterFIN   int
	writesAfterClose int
}

func (s *faceStream) Write(p []byte) (int, error) {
	s.mu.Lock()
	if s.finSent {
		s.writesAfterFIN++
	}
	if s.closed {
		s.writesAfterClose++
	}
	s.mu.Unlock()
	return s.Stream.Write(p)
}

func (s *faceStream) CloseWrite() error {
	err := s.Stream.CloseWrite()
	s.mu.Lock()
	s.closeWrites++
	if err == nil {
		s.finSent = true
	}
	s.mu.Unlock()
	return err
}

func (s *faceStream) Close() error {
	s.mu.Lock()
	s.closes++
	s.closed = true
	s.mu.Unlock()
	return s.Stream.Close()
}

func (s *faceStream) Abort() error {
	s.mu.Lock()
	s.closes++
	s.aborts++
	s.closed = true
	s.mu.Unlock()
	return s.Stream.Abort()
}

// The application's calls.
type faceOpKind uint8

const (
	faceWrite            faceOpKind = iota
	faceRead                        // SetReadDeadline(now+d), then Read
	faceReadAll                     // Read until an error, each with a deadline d ahead
	faceSetReadDeadline             // now+d
	faceSetWriteDeadline            // now+d; d < 0 clears it
	faceSetDeadline                 // both, now+d
	faceCloseWrite
	faceClose
	faceAbort
	faceSetLinger0 // SetLinger(0): a later Close aborts
	faceYield      // time.Sleep(d), or runtime.Gosched if d is 0
)

var faceOpNames = [...]string{"write", "read", "read-all", "set-read-deadline", "set-write-deadline", "set-deadline", "close-write", "close", "abort", "set-linger-0", "yield"}

type faceOp struct {
	kind faceOpKind
	size int           // write: padding of the record; read: buffer size
	d    time.Duration // deadline offset, or yield
}

func (o faceOp) String() string {
	return fmt.Sprintf("%s(%d,%v)", faceOpNames[o.kind], o.size, o.d)
}

func faceDrawOp(t *rapid.T, disrupt bool) faceOp {
	// rapid draws the ends of a range most often: the common calls take
	// them, the closing ones are values in the middle.
	v := rapid.IntRange(0, 99).Draw(t, "op")
	us := func(label string, hi int) time.Duration {
		return time.Duration(rapid.IntRange(0, hi).Draw(t, label)) * time.Microsecond
	}
	switch {
	case v < 35:
		return faceOp{kind: faceWrite, size: rapid.IntRange(0, 64).Draw(t, "pad")}
	case v < 45, v == 99:
		return faceOp{kind: faceRead, size: rapid.IntRange(0, 64).Draw(t, "read-size"), d: us("read-deadline-us", 3000)}
	case v < 48:
		return faceOp{kind: faceReadAll, size: rapid.IntRange(1, 64).Draw(t, "read-size"), d: us("read-deadline-us", 3000)}
	case v < 51:
		return faceOp{kind: faceSetReadDeadline, d: us("read-deadline-us", 3000)}
	case v == 51:
		return faceOp{kind: faceSetDeadline, d: us("deadline-us", 3000)}
	case v < 58:
		d := us("write-deadline-us", 5000)
		if rapid.IntRange(0, 3).Draw(t, "write-deadline-clear") == 0 {
			d = -1
		}
		return faceOp{kind: faceSetWriteDeadline, d: d}
	case v < 62:
		return faceOp{kind: faceCloseWrite}
	case v < 66:
		return faceOp{kind: faceClose}
	case v == 66 && disrupt:
		return faceOp{kind: faceAbort}
	case v == 67 && disrupt:
		return faceOp{kind: faceSetLinger0}
	case v < 80:
		return faceOp{kind: faceYield, d: us("yield-us", 500)}
	}
	return faceOp{kind: faceWrite, size: rapid.IntRange(0, 64).Draw(t, "pad")}
}

// facePeer is the peer's script. Its input has distinct bytes (at most 256,
// seed+i), so that each byte the application reads names its offset.
type facePeer struct {
	input       []byte
	seed        byte
	chunk       int  // the sender's largest write
	readChunk   int  // the reader's buffer
	slow        bool // the reader yields, and now and then sleeps, between reads
	finAfterEOF bool // the FIN comes after the reader's EOF, not after the input
	resetAt     int  // reset (Abort) after this many bytes sent; -1 never
}

func faceDrawPeer(t *rapid.T, disrupt bool) facePeer {
	n := rapid.IntRange(0, 256).Draw(t, "input-len")
	seed := rapid.Byte().Draw(t, "input-seed")
	input := make([]byte, n)
	for i := range input {
		input[i] = seed + byte(i)
	}
	p := facePeer{
		input:       input,
		seed:        seed,
		chunk:       rapid.IntRange(1, 64).Draw(t, "send-chunk"),
		readChunk:   rapid.IntRange(1, 64).Draw(t, "peer-read-chunk"),
		slow:        rapid.Bool().Draw(t, "slow-reader"),
		finAfterEOF: rapid.Bool().Draw(t, "fin-after-eof"),
		resetAt:     -1,
	}
	if disrupt && rapid.IntRange(0, 9).Draw(t, "reset") == 5 {
		p.resetAt = rapid.IntRange(0, n).Draw(t, "reset-at")
	}
	return p
}

// facePeerResult is what the peer saw.
type facePeerResult struct {
	got           []byte // what the reader read
	readErr       error  // what ended reading
	afterEOF      error  // the read after EOF: EOF again, or ECONNRESET
	afterEOFBytes int
	sent          int // the bytes the sender's Writes took
	sendErr       error
	fin           bool // CloseWrite was called
	reset         bool // Abort was called
}

func (p facePeer) play(c transport.Stream, r *facePeerResult) {
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, p.readChunk)
		for i := 0; ; i++ {
			if p.slow {
				runtime.Gosched()
				if i%16 == 15 {
					time.Sleep(20 * time.Microsecond)
				}
			}
			n, err := c.Read(buf)
			r.got = append(r.got, buf[:n]...)
			if err == nil {
				continue
			}
			r.readErr = err
			if err == io.EOF {
				// After our FIN, nothing: EOF again (or the reset of a
				// close over unread input), at once. The deadline only
				// bounds a failing case: a passed deadline takes precedence
				// over EOF, so it must not be short.
				c.SetReadDeadline(time.Now().Add(time.Second))
				r.afterEOFBytes, r.afterEOF = c.Read(buf)
				c.SetReadDeadline(time.Time{})
			}
			return
		}
	}()
	for r.sent < len(p.input) && (p.resetAt < 0 || r.sent < p.resetAt) {
		end := min(r.sent+p.chunk, len(p.input))
		if p.resetAt >= 0 {
			end = min(end, p.resetAt)
		}
		n, err := c.Write(p.input[r.sent:end])
		r.sent += n
		if err != nil {
			r.sendErr = err
			break
		}
	}
	switch {
	case p.resetAt >= 0:
		c.Abort()
		r.reset = true
	case r.sendErr != nil:
		// The server's end is gone.
	default:
		if p.finAfterEOF {
			<-readerDone
		}
		c.CloseWrite()
		r.fin = true
	}
	<-readerDone
}

// faceShared is what the application goroutines share.
type faceShared struct {
	nc       *NetConn
	closed   atomic.Bool  // a Close or Abort returned
	shut     atomic.Bool  // a CloseWrite returned nil, or closed
	closeNil atomic.Int32 // Closes that returned nil
	aborts   atomic.Int32 // Aborts, and SetLinger(0)s (a Close after one aborts)
}

// faceBlock is one Write: its record and what it returned.
type faceBlock struct {
	rec []byte
	n   int
	err error
}

// faceApp is one application goroutine.
type faceApp struct {
	g      int
	ops    []faceOp
	blocks []faceBlock
	reads  [][]byte // the bytes of each Read, in order
	eof    bool     // a Read returned io.EOF
	log    []string
	bad    []string
}

func (a *faceApp) badf(format string, args ...any) {
	a.bad = append(a.bad, fmt.Sprintf("goroutine %c: ", 'A'+a.g)+fmt.Sprintf(format, args...))
}

func (a *faceApp) logf(format string, args ...any) {
	a.log = append(a.log, fmt.Sprintf(format, args...))
}

// checkClosedErr asserts that a call that started after Close failed with
// net.ErrClosed and did nothing.
func (a *faceApp) checkClosedErr(closedBefore bool, what string, n int, err error) {
	if closedBefore && (n != 0 || !errors.Is(err, net.ErrClosed)) {
		a.badf("%s after Close: n=%d err=%v, want net.ErrClosed", what, n, err)
	}
}

func (a *faceApp) read(s *faceShared, size int, d time.Duration) error {
	closedBefore := s.closed.Load()
	derr := s.nc.SetReadDeadline(time.Now().Add(d))
	a.checkClosedErr(closedBefore, "SetReadDeadline", 0, derr)
	buf := make([]byte, size)
	n, err := s.nc.Read(buf)
	a.logf("read(%d)=%d,%v", size, n, err)
	a.checkClosedErr(closedBefore, "Read", n, err)
	if n < 0 || n > size || (n > 0 && err != nil) {
		a.badf("Read returned n=%d err=%v", n, err)
		return err
	}
	if n > 0 {
		a.reads = append(a.reads, bytes.Clone(buf[:n]))
	}
	if err == io.EOF {
		a.eof = true
	}
	return err
}

func (a *faceApp) play(s *faceShared) {
	seq := 0
	for _, op := range a.ops {
		a.do(s, op, &seq)
	}
}

func (a *faceApp) do(s *faceShared, op faceOp, seq *int) {
	nc := s.nc
	closedBefore, shutBefore := s.closed.Load(), s.shut.Load()
	switch op.kind {
	case faceWrite:
		rec := []byte(fmt.Sprintf("%c%d:%s;", 'A'+a.g, *seq, strings.Repeat("-", op.size)))
		*seq++
		n, err := nc.Write(rec)
		a.logf("write(%d)=%d,%v", len(rec), n, err)
		a.blocks = append(a.blocks, faceBlock{rec, n, err})
		a.checkClosedErr(closedBefore, "Write", n, err)
		switch {
		case n < 0 || n > len(rec):
			a.badf("Write of %d bytes returned n=%d", len(rec), n)
		case err == nil && n != len(rec):
			a.badf("Write of %d bytes returned n=%d and no error", len(rec), n)
		case shutBefore && (n != 0 || err == nil):
			a.badf("Write after CloseWrite or Close: n=%d err=%v", n, err)
		}
	case faceRead:
		a.read(s, op.size, op.d)
	case faceReadAll:
		for range 1000 {
			if err := a.read(s, op.size, op.d); err != nil {
				break
			}
		}
	case faceSetReadDeadline:
		err := nc.SetReadDeadline(time.Now().Add(op.d))
		a.checkClosedErr(closedBefore, "SetReadDeadline", 0, err)
	case faceSetDeadline:
		err := nc.SetDeadline(time.Now().Add(op.d))
		a.checkClosedErr(closedBefore, "SetDeadline", 0, err)
	case faceSetLinger0:
		nc.SetLinger(0)
		s.aborts.Add(1)
	case faceSetWriteDeadline:
		var dl time.Time
		if op.d >= 0 {
			dl = time.Now().Add(op.d)
		}
		err := nc.SetWriteDeadline(dl)
		a.checkClosedErr(closedBefore, "SetWriteDeadline", 0, err)
	case faceCloseWrite:
		err := nc.CloseWrite()
		a.logf("close-write=%v", err)
		a.checkClosedErr(closedBefore, "CloseWrite", 0, err)
		if err == nil {
			s.shut.Store(true)
		}
	case faceClose:
		err := nc.Close()
		a.logf("close=%v", err)
		a.checkClosedErr(closedBefore, "Close", 0, err)
		if err == nil {
			s.closeNil.Add(1)
		}
		s.shut.Store(true)
		s.closed.Store(true)
	case faceAbort:
		err := nc.Abort()
		a.logf("abort=%v", err)
		s.aborts.Add(1)
		s.shut.Store(true)
		s.closed.Store(true)
	case faceYield:
		if op.d == 0 {
			runtime.Gosched()
		} else {
			time.Sleep(op.d)
		}
	}
}

// faceWorld is one case, played to the end.
type faceWorld struct {
	cfg      Config
	capacity int
	peer     facePeer
	apps     []*faceApp
	shared   *faceShared
	stream   *faceStream
	peerEnd  transport.Stream
	pr       facePeerResult
	d        *driver
	result   CloseInfo
	edges    []edge
	hooks    int
	hookInfo CloseInfo
	elapsed  time.Duration
}

// trace describes the case for a failure message.
func (w *faceWorld) trace() string { return w.traceOf(true, true) }

// traceOf describes the case, with what the peer and the application
// goroutines saw if they are done.
func (w *faceWorld) traceOf(peerDone, appsDone bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\ncapacity=%d read-buffer=%d max-output=%d; peer: input=%d chunk=%d read-chunk=%d slow=%v fin-after-eof=%v reset-at=%d",
		w.capacity, w.cfg.ReadBufferSize, w.cfg.MaxPendingOutput, len(w.peer.input), w.peer.chunk, w.peer.readChunk, w.peer.slow, w.peer.finAfterEOF, w.peer.resetAt)
	if peerDone {
		fmt.Fprintf(&b, "\npeer: sent=%d got=%d read-err=%v after-eof=%v send-err=%v fin=%v reset=%v",
			w.pr.sent, len(w.pr.got), w.pr.readErr, w.pr.afterEOF, w.pr.sendErr, w.pr.fin, w.pr.reset)
	}
	fmt.Fprintf(&b, "\nresult: %+v (after %v)", w.result, w.elapsed)
	for _, a := range w.apps {
		fmt.Fprintf(&b, "\ngoroutine %c: %v", 'A'+a.g, a.ops)
		if appsDone {
			fmt.Fprintf(&b, "\n    %s", strings.Join(a.log, " "))
		}
	}
	return b.String()
}

// faceRun draws a case and plays it. disrupt allows the application's Abort
// and the peer's reset.
func faceRun(t *rapid.T, disrupt bool) *faceWorld {
	w := &faceWorld{
		cfg:      faceDrawConfig(t),
		capacity: rapid.IntRange(1, 64).Draw(t, "pipe-capacity"),
		peer:     faceDrawPeer(t, disrupt),
	}
	for g := range rapid.IntRange(1, 3).Draw(t, "goroutines") {
		a := &faceApp{g: g}
		for range rapid.IntRange(0, 8).Draw(t, "ops") {
			a.ops = append(a.ops, faceDrawOp(t, disrupt))
		}
		w.apps = append(w.apps, a)
	}

	cfg := w.cfg
	if err := cfg.Validate(); err != nil {
		t.Fatalf("drew an invalid config: %v", err)
	}
	var hookMu sync.Mutex // the hooks run on the driver's goroutine; read after run
	cfg.OnStateChange = func(_ ConnInfo, from, to fsm.State, ev fsm.Event) {
		hookMu.Lock()
		w.edges = append(w.edges, edge{from, to, ev})
		hookMu.Unlock()
	}
	cfg.OnClose = func(_ ConnInfo, info CloseInfo) {
		hookMu.Lock()
		w.hooks++
		w.hookInfo = info
		hookMu.Unlock()
	}

	// As Listener.Accept builds a connection (Server.start, without the
	// Server's bookkeeping).
	serverEnd, peerEnd := transport.PipeSize(w.capacity)
	w.stream = &faceStream{Stream: serverEnd}
	w.peerEnd = peerEnd
	info := ConnInfo{ID: connIDs.Add(1), LocalAddr: serverEnd.LocalAddr(), RemoteAddr: serverEnd.RemoteAddr()}
	lim := cfg.limits()
	nc := newNetConn(info, lim.readBuf)
	w.d = &driver{}
	w.d.init(w.stream, lim, nc, info, &cfg, time.Now)
	nc.c = w.d.e.Conn()
	w.shared = &faceShared{nc: nc}

	start := time.Now()
	bound := time.NewTimer(faceCaseBound)
	defer bound.Stop()
	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		w.d.run()
	}()
	peerDone := make(chan struct{})
	go func() {
		defer close(peerDone)
		w.peer.play(peerEnd, &w.pr)
	}()
	appsDone := make(chan struct{})
	var wg sync.WaitGroup
	for _, a := range w.apps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.play(w.shared)
		}()
	}
	go func() {
		wg.Wait()
		close(appsDone)
	}()

	stage := "the application goroutines"
	wait := func(ch chan struct{}) bool {
		select {
		case <-ch:
			return true
		case <-bound.C:
			return false
		}
	}
	ok := wait(appsDone)
	if ok {
		// The application's deferred Close, once its goroutines are done.
		closer := &faceApp{g: len(w.apps)}
		closer.do(w.shared, faceOp{kind: faceClose}, new(int))
		if len(closer.bad) > 0 {
			w.apps[0].bad = append(w.apps[0].bad, closer.bad...) // read after the goroutines ended
		}
		stage = "the driver's run"
		if ok = wait(runDone); ok {
			stage = "the peer"
			ok = wait(peerDone)
		}
	}
	w.elapsed = time.Since(start)
	if !ok {
		// Unstick everything, so that no goroutine outlives the case, then
		// fail.
		nc.Abort()
		peerEnd.Abort()
		unstuck := time.After(2 * time.Second)
		done := make([]bool, 3)
		for i, ch := range []chan struct{}{appsDone, runDone, peerDone} {
			select {
			case <-ch:
				done[i] = true
			case <-unstuck:
			}
		}
		t.Fatalf("case did not finish within %v: stuck in %s (done after the aborts: apps %v, driver %v, peer %v); engine in %s, NetConn %s%s",
			faceCaseBound, stage, done[0], done[1], done[2], w.d.e.State(), faceNetConnState(nc), w.traceOf(done[2], done[0]))
	}
	w.result = w.d.result
	return w
}

func faceNetConnState(nc *NetConn) string {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	return fmt.Sprintf("{in=%d paused=%v eof=%v closed=%v ended=%v flushes=%d}", len(nc.in), nc.paused, nc.eof, nc.closed, nc.ended, nc.flushes)
}

// faceDrawConfig draws a Config whose timeouts a well-behaved case never
// reaches (they are longer than faceCaseBound), with small buffers so that
// the backpressure paths run: Write waiting for MaxPendingOutput, reading
// paused at ReadBufferSize.
func faceDrawConfig(t *rapid.T) Config {
	long := func(label string) time.Duration {
		return time.Duration(rapid.IntRange(10, 60).Draw(t, label)) * time.Second
	}
	idle := time.Duration(-1) // the Listener's default
	if rapid.Bool().Draw(t, "idle-on") {
		idle = long("idle")
	}
	lingerBytes := int64(-1)
	if rapid.Bool().Draw(t, "linger-bytes-default") {
		lingerBytes = 0 // 1 MiB, far more than a case sends
	}
	return Config{
		IdleTimeout:      idle,
		WriteTimeout:     long("write"),
		LingerTimeout:    long("linger-timeout"),
		LingerTime:       long("linger-time"),
		LingerBytes:      lingerBytes,
		MaxLifetime:      -1,
		ReadBufferSize:   rapid.IntRange(1, 64).Draw(t, "read-buffer"),
		MaxPendingOutput: rapid.IntRange(1, 128).Draw(t, "max-output"),
		Logger:           slog.New(discardHandler{}),
	}
}

// faceParse matches what the peer received against the Writes: the output
// queue is the concatenation of each Write's first n bytes (Writes are
// serialized, and a Write's bytes are queued together), in an order that
// keeps each goroutine's own; the peer received a prefix of it. A record's
// first byte names its goroutine, so the match is unique. It reports
// which Write's bytes were not all received, if any.
func faceParse(got []byte, apps []*faceApp) (missing string, err error) {
	next := make([]int, len(apps))
	skip := func(g int) {
		for next[g] < len(apps[g].blocks) && apps[g].blocks[next[g]].n == 0 {
			next[g]++
		}
	}
	for pos := 0; pos < len(got); {
		g := int(got[pos]) - 'A'
		if g < 0 || g >= len(apps) {
			return "", fmt.Errorf("byte %d (%q) starts no goroutine's record: %q", pos, got[pos], got[pos:min(len(got), pos+40)])
		}
		skip(g)
		if next[g] == len(apps[g].blocks) {
			return "", fmt.Errorf("byte %d: goroutine %c wrote nothing more, the peer got %q", pos, 'A'+g, got[pos:min(len(got), pos+40)])
		}
		b := apps[g].blocks[next[g]]
		want := b.rec[:b.n]
		rest := got[pos:]
		if len(rest) < len(want) {
			if !bytes.Equal(rest, want[:len(rest)]) {
				return "", fmt.Errorf("byte %d: the peer got %q, goroutine %c's next Write queued %q", pos, rest, 'A'+g, want)
			}
			return fmt.Sprintf("goroutine %c's Write %q (n=%d err=%v) was cut after %d bytes", 'A'+g, b.rec, b.n, b.err, len(rest)), nil
		}
		if !bytes.Equal(rest[:len(want)], want) {
			return "", fmt.Errorf("byte %d: the peer got %q, goroutine %c's next Write queued %q (it returned %v)", pos, rest[:len(want)], 'A'+g, want, b.err)
		}
		pos += len(want)
		next[g]++
	}
	for g := range apps {
		skip(g)
		if next[g] < len(apps[g].blocks) {
			b := apps[g].blocks[next[g]]
			return fmt.Sprintf("goroutine %c's Write %q (n=%d err=%v) never reached the peer", 'A'+g, b.rec, b.n, b.err), nil
		}
	}
	return "", nil
}

// faceCheckReads asserts that the application read a prefix of the peer's
// input, each goroutine in order, no byte twice, and all of it if a Read
// returned io.EOF.
func faceCheckReads(t *rapid.T, w *faceWorld) {
	seen := make([]bool, 256)
	total := 0
	eof := false
	for _, a := range w.apps {
		eof = eof || a.eof
		last := -1
		for _, p := range a.reads {
			for i, c := range p {
				off := int(c - w.peer.seed)
				switch {
				case off >= w.pr.sent:
					t.Fatalf("goroutine %c read byte %d, the peer sent %d%s", 'A'+a.g, off, w.pr.sent, w.trace())
				case seen[off]:
					t.Fatalf("byte %d read twice%s", off, w.trace())
				case i > 0 && off != last+1:
					t.Fatalf("goroutine %c read bytes %d then %d in one Read%s", 'A'+a.g, last, off, w.trace())
				case off <= last:
					t.Fatalf("goroutine %c read byte %d after byte %d%s", 'A'+a.g, off, last, w.trace())
				}
				seen[off] = true
				last = off
				total++
			}
		}
	}
	for i := range total {
		if !seen[i] {
			t.Fatalf("the application read %d bytes but not byte %d: not a prefix of the input%s", total, i, w.trace())
		}
	}
	if eof && total != w.pr.sent {
		t.Fatalf("a Read returned io.EOF, but the application read %d of the %d bytes the peer sent before its FIN%s", total, w.pr.sent, w.trace())
	}
	if int64(total) > w.result.BytesRead-w.result.Discarded {
		t.Fatalf("the application read %d bytes, the engine read %d and discarded %d%s", total, w.result.BytesRead, w.result.Discarded, w.trace())
	}
}

// faceCheckCommon asserts what holds in every case.
func faceCheckCommon(t *rapid.T, w *faceWorld) {
	for _, a := range w.apps {
		for _, b := range a.bad {
			t.Fatalf("%s%s", b, w.trace())
		}
	}
	res, s := w.result, w.stream

	// No send after shutdown.
	if s.writesAfterFIN != 0 || s.writesAfterClose != 0 {
		t.Fatalf("%d writes reached the transport after our FIN, %d after its close%s", s.writesAfterFIN, s.writesAfterClose, w.trace())
	}
	afterEOFok := w.pr.afterEOF == io.EOF || errors.Is(w.pr.afterEOF, syscall.ECONNRESET) ||
		(w.pr.reset && errors.Is(w.pr.afterEOF, net.ErrClosed)) // the peer's own reset closed its end
	if w.pr.readErr == io.EOF && (w.pr.afterEOFBytes != 0 || !afterEOFok) {
		t.Fatalf("the peer read %d bytes, %v after our FIN%s", w.pr.afterEOFBytes, w.pr.afterEOF, w.trace())
	}
	switch res.Reason {
	case ReasonWriteError, ReasonReadError, ReasonInternal, ReasonHandlerPanic, ReasonWriteTimeout, ReasonIdleTimeout, ReasonMaxLifetime, ReasonNone:
		t.Fatalf("the connection ended with %s: %v%s", res.Reason, res.Err, w.trace())
	case ReasonPeerReset:
		if !w.pr.reset {
			t.Fatalf("the peer did not reset, the reason is %s%s", res.Reason, w.trace())
		}
	case ReasonHandlerAbort:
		if w.shared.aborts.Load() == 0 {
			t.Fatalf("the application did not Abort nor SetLinger(0), the reason is %s%s", res.Reason, w.trace())
		}
	case ReasonHandlerClose:
	default:
		t.Fatalf("unexpected reason %s%s", res.Reason, w.trace())
	}

	// Every connection closed exactly once.
	if st := w.d.e.State(); st != fsm.Closed {
		t.Fatalf("run returned in state %s%s", st, w.trace())
	}
	if s.closes != 1 || s.closeWrites > 1 {
		t.Fatalf("transport closed %d times (%d aborts), CloseWrite called %d times%s", s.closes, s.aborts, s.closeWrites, w.trace())
	}
	if (s.aborts == 1) != res.Aborted() {
		t.Fatalf("transport aborted %d times, the reason is %s%s", s.aborts, res.Reason, w.trace())
	}
	if err := s.Stream.SetReadDeadline(time.Time{}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the server's pipe end is not closed: %v%s", err, w.trace())
	}
	if w.hooks != 1 || w.hookInfo != res {
		t.Fatalf("Config.OnClose called %d times with %+v; run returned %+v%s", w.hooks, w.hookInfo, res, w.trace())
	}
	if info, ok := w.shared.nc.CloseInfo(); !ok || info != res {
		t.Fatalf("NetConn.CloseInfo() = %+v, %v; run returned %+v%s", info, ok, res, w.trace())
	}
	checkEdges(t, w.edges)
	if !w.pr.reset {
		// The server's end is closed: the peer reads EOF or ECONNRESET,
		// and nothing more.
		w.peerEnd.SetReadDeadline(time.Now().Add(time.Second)) // at once, unless failing
		n, err := w.peerEnd.Read(make([]byte, 16))
		if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
			t.Fatalf("after the close the peer read %d bytes, %v; want EOF or ECONNRESET%s", n, err, w.trace())
		}
	}
	w.peerEnd.Close()
	closeNil, aborts := w.shared.closeNil.Load(), w.shared.aborts.Load()
	if closeNil > 1 || (aborts == 0 && closeNil != 1) {
		t.Fatalf("%d Closes returned nil (%d Aborts or SetLinger(0)s)%s", closeNil, aborts, w.trace())
	}

	// Output: a prefix of the Writes' bytes, as the peer got them.
	if _, err := faceParse(w.pr.got, w.apps); err != nil {
		t.Fatalf("%v%s", err, w.trace())
	}
	if int64(len(w.pr.got)) > res.BytesWritten {
		t.Fatalf("the peer got %d bytes, the engine wrote %d%s", len(w.pr.got), res.BytesWritten, w.trace())
	}
	// Input.
	faceCheckReads(t, w)
}

// faceCheckGraceful asserts, for a case without Abort or reset, that every
// byte of every Write reached the peer, then our FIN, and no reset.
func faceCheckGraceful(t *rapid.T, w *faceWorld) {
	res := w.result
	if res.Aborted() || res.Reason != ReasonHandlerClose || !res.PeerFIN || (res.Linger != LingerEndNone && res.Linger != LingerEndPeerFIN) {
		t.Fatalf("a well-behaved connection ended with %+v%s", res, w.trace())
	}
	if w.pr.readErr != io.EOF || w.pr.sendErr != nil || w.pr.sent != len(w.peer.input) || !w.pr.fin {
		t.Fatalf("the peer did not end cleanly: read %v, send %v%s", w.pr.readErr, w.pr.sendErr, w.trace())
	}
	if missing, err := faceParse(w.pr.got, w.apps); err != nil || missing != "" {
		t.Fatalf("not every byte written was delivered: %s%v%s", missing, err, w.trace())
	}
	if int64(len(w.pr.got)) != res.BytesWritten || res.BytesRead != int64(w.pr.sent) {
		t.Fatalf("the peer got %d bytes and sent %d; the engine wrote %d and read %d%s", len(w.pr.got), w.pr.sent, res.BytesWritten, res.BytesRead, w.trace())
	}
}
