// Package sim is a deterministic simulated peer and network on a virtual
// clock, for testing the sockfsm engine without real sockets or real time.
//
// A Socket is the server's end of a simulated TCP connection. It runs on the
// caller's goroutine: a call that would block (a read with nothing to read,
// a write the peer's window cannot take) advances the virtual clock to the
// peer's next action or to the deadline, whichever comes first. Every choice
// the peer makes (delays, chunk sizes, when to send FIN or RST, when to stop
// reading) comes from a Chooser, so a test framework such as
// pgregory.net/rapid can draw, shrink and replay them from a seed. There is
// no math/rand and no sleeping.
//
// The Socket records what the properties of the engine are about: every write
// attempted after our half-close or close, how often the connection was
// closed, whether we closed with unread input (a kernel would send RST), and
// what the peer received and lost.
package sim

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// Chooser makes the peer's choices.
type Chooser interface {
	// Intn returns a number in [0, n). label names the choice.
	Intn(label string, n int) int
}

// Clock is a virtual clock. The zero value starts at the zero time.
type Clock struct{ t time.Time }

// NewClock returns a clock reading start.
func NewClock(start time.Time) *Clock { return &Clock{t: start} }

// Now returns the virtual time.
func (c *Clock) Now() time.Time { return c.t }

// Advance moves the clock forward by d (never back).
func (c *Clock) Advance(d time.Duration) {
	if d > 0 {
		c.t = c.t.Add(d)
	}
}

// Peer describes how the simulated peer behaves.
type Peer struct {
	// Input is what the peer sends, in chunks of 1 to MaxChunk bytes.
	Input []byte
	// MaxChunk bounds the peer's chunks (default 64).
	MaxChunk int
	// MaxDelay bounds the pause before each of the peer's actions
	// (default 1s).
	MaxDelay time.Duration
	// Window is how many of our bytes the peer's receive buffer holds
	// before our writes block (default 256).
	Window int
	// FIN: the peer half-closes once it has sent Input. Without it the
	// peer never sends FIN.
	FIN bool
	// Faults lets the chooser make the peer misbehave: reset at any
	// moment, stop reading, go silent forever, make our reads or writes
	// fail, and stop sending before Input is all sent.
	Faults bool
}

// Errors the simulation returns.
var (
	// ErrInjected is a read or write error injected by a faulty peer.
	ErrInjected = errors.New("sockfsm: sim: injected i/o error")
	// ErrStuck is returned by a read or write that would block forever:
	// no deadline is set and the peer will never act again.
	ErrStuck = errors.New("sockfsm: sim: blocked forever with no deadline")
	// ErrShutdown is returned by a write after CloseWrite.
	ErrShutdown = errors.New("sockfsm: sim: write after CloseWrite")
)

// Record is what happened on a Socket.
type Record struct {
	// Sent is what the peer sent; Read is what we read of it.
	Sent, Read []byte
	// ReadAfterFIN counts the bytes we read after our CloseWrite: the
	// linger's reads.
	ReadAfterFIN int
	// Received is what the peer's application has read of our output, in
	// order; Lost is what our RST (or the kernel's, for a close with
	// unread input) destroyed in the peer's receive buffer.
	Received, Lost []byte
	// GotFIN: the peer's application read our FIN after all our data.
	GotFIN bool
	// GotRST: the peer saw an RST from us.
	GotRST bool

	Writes              int // Write calls
	WritesAfterShutdown int // Write calls after CloseWrite, Close or Abort
	CloseWrites         int // CloseWrite calls
	Closes              int // Close and Abort calls, together
	Aborts              int // Abort calls
	// ClosedWithUnread: Close was called while input from the peer was
	// unread, which makes a kernel send RST.
	ClosedWithUnread bool
	// Stuck: a call would have blocked forever.
	Stuck bool
	// PeerReset: the peer reset the connection.
	PeerReset bool
	// LastInput is when we last read input or the peer's FIN; ClosedAt
	// is when Close or Abort was first called.
	LastInput, ClosedAt time.Time
	// Ops counts Read, Write and CloseWrite calls; a test bounds it
	// against livelock.
	Ops int
}

// Socket is the server's end of a simulated connection. It implements the
// engine's transport and is not safe for concurrent use: the hook runs on
// the same goroutine.
type Socket struct {
	clock *Clock
	ch    Chooser
	peer  Peer
	// Hook, if set, is called before each of the peer's actions, on the
	// caller's goroutine; a test uses it to shut the server down at a
	// random moment.
	Hook func()

	Rec Record

	toSend    []byte // the peer's Input not yet sent
	inbuf     []byte // sent by the peer, not yet read by us
	peerFIN   bool   // the peer sent FIN after inbuf
	peerRST   bool   // the peer reset
	silent    bool   // the peer will never act again
	stopped   bool   // the peer's application stopped reading
	failNext  bool   // the next read or write fails with ErrInjected
	window    []byte // our bytes in the peer's receive buffer
	finSent   bool
	closed    bool
	rdl, wdl  time.Time
	startTime time.Time
	waiting   bool // in Wait
}

// Waiting reports whether the driver is in Wait: its handler paused
// reading, and only a wake-up or the deadline ends the wait.
func (c *Socket) Waiting() bool { return c.waiting }

// NewSocket returns a connection to a peer that behaves as p, on clock c, with
// choices from ch.
func NewSocket(c *Clock, ch Chooser, p Peer) *Socket {
	if p.MaxChunk <= 0 {
		p.MaxChunk = 64
	}
	if p.MaxDelay <= 0 {
		p.MaxDelay = time.Second
	}
	if p.Window <= 0 {
		p.Window = 256
	}
	return &Socket{clock: c, ch: ch, peer: p, toSend: p.Input, startTime: c.Now()}
}

func (c *Socket) pick(label string, n int) int {
	if n <= 1 {
		return 0
	}
	return c.ch.Intn(label, n)
}

// actions a peer can take.
const (
	actSend = iota
	actFIN
	actDrain
	actReset
	actStop
	actResume
	actSilent
	actFail
	numActs
)

// act advances the clock to the peer's next action, or to the deadline
// *dl if that comes first (a zero deadline means none), and performs the
// action. It reports false if the peer will never act again and there is
// no deadline. The deadline is read after the hook, which may move it (a
// wake-up); one that has passed ends the wait at once.
func (c *Socket) act(dl *time.Time) bool {
	if c.Hook != nil {
		c.Hook()
	}
	deadline := *dl
	if !deadline.IsZero() && !c.clock.t.Before(deadline) {
		return true
	}
	if c.silent {
		if deadline.IsZero() {
			c.Rec.Stuck = true
			return false
		}
		c.clock.t = maxTime(c.clock.t, deadline)
		return true
	}
	steps := 1000
	delay := c.peer.MaxDelay * time.Duration(c.pick("delay", steps+1)) / time.Duration(steps)
	next := c.clock.t.Add(delay)
	if !deadline.IsZero() && !next.Before(deadline) {
		c.clock.t = maxTime(c.clock.t, deadline)
		return true
	}
	c.clock.t = next

	// The well-behaved moves: send, FIN, drain our output.
	var moves []int
	if len(c.toSend) > 0 {
		moves = append(moves, actSend)
	} else if c.peer.FIN && !c.peerFIN {
		moves = append(moves, actFIN)
	}
	if len(c.window) > 0 && !c.stopped {
		moves = append(moves, actDrain)
	}
	// A faulty peer misbehaves on one move in sixteen, or when it has no
	// well-behaved move left.
	if c.peer.Faults && (len(moves) == 0 || c.pick("misbehave", 16) == 7) {
		moves = moves[:0]
		moves = append(moves, actReset, actSilent, actFail)
		if c.stopped {
			moves = append(moves, actResume)
		} else {
			moves = append(moves, actStop)
		}
		if !c.peerFIN {
			moves = append(moves, actFIN)
		}
	}
	if len(moves) == 0 {
		// Nothing left to do: a well-behaved peer that has sent all and
		// drained all waits.
		if deadline.IsZero() {
			c.silent = true
			c.Rec.Stuck = true
			return false
		}
		c.clock.t = maxTime(c.clock.t, deadline)
		return true
	}
	switch moves[c.pick("action", len(moves))] {
	case actSend:
		n := 1 + c.pick("chunk", min(len(c.toSend), c.peer.MaxChunk))
		if !c.peerFIN && !c.peerRST {
			c.inbuf = append(c.inbuf, c.toSend[:n]...)
			c.Rec.Sent = append(c.Rec.Sent, c.toSend[:n]...)
		}
		c.toSend = c.toSend[n:]
	case actFIN:
		c.peerFIN = true
		c.toSend = nil
	case actDrain:
		n := 1 + c.pick("drain", len(c.window))
		c.Rec.Received = append(c.Rec.Received, c.window[:n]...)
		c.window = c.window[n:]
		if len(c.window) == 0 && c.finSent && !c.closed {
			c.Rec.GotFIN = true
		}
	case actReset:
		c.peerRST = true
		c.Rec.PeerReset = true
		c.silent = true
	case actStop:
		c.stopped = true
	case actResume:
		c.stopped = false
	case actSilent:
		c.silent = true
	case actFail:
		c.failNext = true
	}
	return true
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

var errReset = &net.OpError{Op: "read", Net: "sim", Err: os.NewSyscallError("read", syscall.ECONNRESET)}

// Read reads the peer's input, advancing the clock while there is none.
func (c *Socket) Read(p []byte) (int, error) {
	c.Rec.Ops++
	for {
		switch {
		case c.closed:
			return 0, net.ErrClosed
		case c.peerRST:
			return 0, errReset
		case c.failNext:
			c.failNext = false
			return 0, ErrInjected
		case len(c.inbuf) > 0 && len(p) > 0:
			n := 1 + c.pick("read", min(len(p), len(c.inbuf)))
			copy(p, c.inbuf[:n])
			c.inbuf = c.inbuf[n:]
			c.Rec.Read = append(c.Rec.Read, p[:n]...)
			if c.finSent {
				c.Rec.ReadAfterFIN += n
			}
			c.Rec.LastInput = c.clock.t
			if len(c.inbuf) == 0 && c.peerFIN && c.pick("eof-with-data", 2) == 1 {
				return n, io.EOF // as io.Reader allows, and TLS does
			}
			return n, nil
		case c.peerFIN && len(c.inbuf) == 0:
			c.Rec.LastInput = c.clock.t
			return 0, io.EOF
		case !c.rdl.IsZero() && !c.clock.t.Before(c.rdl):
			return 0, os.ErrDeadlineExceeded
		}
		if !c.act(&c.rdl) {
			return 0, ErrStuck
		}
	}
}

// Wait waits without reading, advancing the clock, until the read deadline
// passes; a wake-up moves it into the past. It is how a driver waits on the
// virtual clock while its handler has paused reading, and it returns
// os.ErrDeadlineExceeded as a read would.
func (c *Socket) Wait() error {
	c.Rec.Ops++
	c.waiting = true
	defer func() { c.waiting = false }()
	for {
		switch {
		case c.closed:
			return net.ErrClosed
		case !c.rdl.IsZero() && !c.clock.t.Before(c.rdl):
			return os.ErrDeadlineExceeded
		}
		if !c.act(&c.rdl) {
			return ErrStuck
		}
	}
}

// Write hands p to the peer's receive window, advancing the clock while the
// window is full. Like a kernel it returns short only with an error.
func (c *Socket) Write(p []byte) (int, error) {
	c.Rec.Ops++
	if c.finSent || c.closed {
		c.Rec.WritesAfterShutdown++
		if c.closed {
			return 0, net.ErrClosed
		}
		return 0, ErrShutdown
	}
	c.Rec.Writes++
	n := 0
	for n < len(p) {
		switch {
		case c.peerRST:
			return n, errReset
		case c.failNext:
			c.failNext = false
			return n, ErrInjected
		case !c.wdl.IsZero() && !c.clock.t.Before(c.wdl):
			return n, os.ErrDeadlineExceeded
		}
		if free := c.peer.Window - len(c.window); free > 0 {
			k := 1 + c.pick("write", min(free, len(p)-n))
			c.window = append(c.window, p[n:n+k]...)
			n += k
			continue
		}
		if !c.act(&c.wdl) {
			return n, ErrStuck
		}
	}
	return n, nil
}

// CloseWrite sends our FIN after the bytes already written.
func (c *Socket) CloseWrite() error {
	c.Rec.Ops++
	c.Rec.CloseWrites++
	if c.closed {
		return net.ErrClosed
	}
	if c.peerRST {
		return errReset
	}
	c.finSent = true
	if len(c.window) == 0 {
		c.Rec.GotFIN = true
	}
	return nil
}

func (c *Socket) close(abort bool) error {
	c.Rec.Closes++
	if c.closed {
		return net.ErrClosed
	}
	c.closed = true
	c.Rec.ClosedAt = c.clock.t
	unread := len(c.inbuf) > 0
	if unread {
		c.Rec.ClosedWithUnread = true
	}
	if abort || unread {
		// RST: whatever the peer had not read is gone.
		if !c.peerRST {
			c.Rec.GotRST = true
		}
		c.Rec.Lost = append(c.Rec.Lost, c.window...)
		c.window = nil
		return nil
	}
	// FIN (if not sent already): the peer can read the rest, then EOF,
	// once it reads again.
	if !c.stopped && !c.peerRST {
		c.Rec.Received = append(c.Rec.Received, c.window...)
		c.window = nil
		c.Rec.GotFIN = true
	}
	return nil
}

// Close closes the connection. With unread input it resets the peer, as a
// kernel does.
func (c *Socket) Close() error { return c.close(false) }

// Abort closes the connection with RST.
func (c *Socket) Abort() error {
	c.Rec.Aborts++
	return c.close(true)
}

// Pending returns our bytes still in the peer's receive buffer, not yet read
// by the peer's application.
func (c *Socket) Pending() []byte { return c.window }

// SetReadDeadline sets the read deadline on the virtual clock.
func (c *Socket) SetReadDeadline(t time.Time) error { c.rdl = t; return nil }

// SetWriteDeadline sets the write deadline on the virtual clock.
func (c *Socket) SetWriteDeadline(t time.Time) error { c.wdl = t; return nil }

// SetDeadline sets both deadlines.
func (c *Socket) SetDeadline(t time.Time) error { c.rdl, c.wdl = t, t; return nil }

// Addr is a simulated address.
type Addr string

// Network returns "sim".
func (Addr) Network() string { return "sim" }

// String returns the address.
func (a Addr) String() string { return string(a) }

// LocalAddr returns "sim:server".
func (c *Socket) LocalAddr() net.Addr { return Addr("sim:server") }

// RemoteAddr returns "sim:peer".
func (c *Socket) RemoteAddr() net.Addr { return Addr("sim:peer") }
