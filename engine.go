package sockfsm

import (
	"context"
	"errors"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// Op is an I/O operation the engine asks its driver to perform: the fsm
// package says which for each state (fsm.State.Op).
type Op = fsm.Op

// The operations. After performing one, the driver reports its result with
// the matching method: Start, ReadDone, WriteDone, CloseWriteDone or
// CloseDone. OpWait has no result: the driver waits for the deadline or a
// wake-up, then calls HandleTimeout.
const (
	// OpStart: run the transport's handshake, if it has one, then call
	// Start.
	OpStart = fsm.OpStart
	// OpRead: read into a buffer of any size, with the read deadline
	// Action.Deadline (zero: none); report with ReadDone.
	OpRead = fsm.OpRead
	// OpWait: the handler paused reading. Perform no I/O; wait until
	// Action.Deadline (zero: none) or the waker, then call HandleTimeout.
	OpWait = fsm.OpWait
	// OpWrite: write Action.Data with the write deadline Action.Deadline;
	// report with WriteDone.
	OpWrite = fsm.OpWrite
	// OpCloseWrite: half-close the transport (our FIN); report with
	// CloseWriteDone.
	OpCloseWrite = fsm.OpCloseWrite
	// OpClose: close the transport gracefully; report with CloseDone.
	OpClose = fsm.OpClose
	// OpAbort: abort the transport (RST); report with CloseDone.
	OpAbort = fsm.OpAbort
	// OpDone: nothing more; the connection is closed and the handler told.
	OpDone = fsm.OpDone
)

// Result classifies how an operation ended. The driver classifies the
// transport's errors (Classify does it for net.Conn-like transports), so
// the engine needs to know nothing of os or syscall.
type Result uint8

// The results.
const (
	// ResultOK: the operation completed; a read returned data.
	ResultOK Result = iota
	// ResultEOF: a read found the peer's FIN (end of file).
	ResultEOF
	// ResultTimeout: the operation stopped at its deadline or was woken
	// by the waker: not an error of the connection. The engine checks its
	// own timers; the bytes written so far still count.
	ResultTimeout
	// ResultReset: the peer reset the connection (ECONNRESET, EPIPE).
	ResultReset
	// ResultError: any other error.
	ResultError
)

var resultNames = [...]string{"ok", "eof", "timeout", "reset", "error"}

// String returns the result's name.
func (r Result) String() string {
	if int(r) < len(resultNames) {
		return resultNames[r]
	}
	return "Result(?)"
}

// Action is the engine's next request to its driver.
type Action struct {
	Op Op
	// Data is what OpWrite writes. It aliases the engine's output queue:
	// it stays valid, and must not be modified, until the driver reports
	// the write with WriteDone.
	Data []byte
	// Deadline is the deadline of OpRead, OpWait and OpWrite; zero means
	// none. It is the engine's own timer: when it passes, the engine acts
	// on its next step.
	Deadline time.Time
}

// closeKind is what closing has been asked for.
type closeKind uint8

const (
	closeNone closeKind = iota
	closeHalf           // our FIN; input still goes to the handler
	closeFull           // our FIN; input is discarded until the peer's FIN
)

// ownerClose is what became of the owner's Close.
type ownerClose uint8

const (
	ownerNone  ownerClose = iota
	ownerAsked            // Close was called: the close is asked at the end of the step
	ownerFirst            // the close waits for the first input (FirstInputGrace)
)

// timer names the deadline of the current state.
type timer uint8

const (
	timerNone timer = iota
	timerIdle
	timerLifetime
	timerWrite
	timerLingerTimeout
	timerLingerTime
)

// init checks what internal relies on: abort is an edge from every state
// that mayClose allows, so that an engine bug can always be aborted.
func init() {
	for _, s := range fsm.States() {
		switch s {
		case fsm.Closing, fsm.Aborting, fsm.Closed:
			continue
		}
		if _, ok := fsm.Lookup(s, fsm.Abort); !ok {
			panic("sockfsm: the table has no abort edge from " + s.String())
		}
	}
}

// maxSettle bounds the state-triggered transitions of one step: the longest
// chain the rules allow is a handful of events. More is an engine bug.
const maxSettle = 16

// Engine is the lifecycle of one connection, with no I/O of its own. It is
// a sans-IO core in the manner of quinn-proto's Connection and etcd raft's
// RawNode: a driver performs the operations it asks for on a transport and
// reports the results; every call that advances it takes the current time,
// so an Engine runs on a virtual clock as well as on the real one.
//
// The methods come in four kinds:
//
//   - Steps, called by the driver from one goroutine at a time: Start,
//     ReadDone, WriteDone, CloseWriteDone, CloseDone and HandleTimeout. They
//     fire events, call the handler and apply the fsm package's
//     state-triggered rules.
//   - Polls, which fire nothing: Next returns the operation to perform
//     (it starts the flush clock, nothing else), Timeout the engine's next
//     deadline, Pending whether a request waits to be handled.
//   - Requests, safe from any goroutine at any time: Close, Abort, and the
//     methods of Conn (Write, CloseWrite, Close, Abort, Do, PauseRead,
//     ResumeRead). They record what is asked and, when the driver is
//     blocked in an operation that must end first, call the waker set with
//     SetWaker. The driver's next step takes them.
//   - Getters, safe from any goroutine: State, Info, CloseInfo, Conn.
//
// A driver's loop:
//
//	e.Start(now) // after the handshake, if any
//	for {
//		a := e.Next(now)
//		// Arm a.Deadline; then, before blocking, if e.Pending() { e.HandleTimeout(now); continue }
//		switch a.Op {
//		case OpRead: p, err := read(); e.ReadDone(now, p, Classify(err), err)
//		case OpWait: wait for a.Deadline or the waker; e.HandleTimeout(now)
//		case OpWrite: n, err := write(a.Data); e.WriteDone(now, n, Classify(err), err)
//		case OpCloseWrite: err := closeWrite(); e.CloseWriteDone(now, Classify(err), err)
//		case OpClose, OpAbort: close or abort; e.CloseDone(now)
//		case OpDone: return e.CloseInfo()
//		}
//	}
//
// ServeConn and Server are drivers of their own built on this API alone.
type Engine struct {
	// mu guards everything below: the driver's steps hold it, and release
	// it only around the handler's callbacks and the hooks; requests from
	// other goroutines take it briefly.
	//
	// The layout is kept small for idle connections (docs/performance.md,
	// "Memory model"; TestEngineSize): what every connection of a Config
	// shares is behind sh, what few connections use is behind cold, the
	// clocks are offsets from start, and the one-byte fields are packed.
	mu sync.Mutex
	m  fsm.Machine

	caps        handlerCaps // the optional handler interfaces h implements
	closeKind   closeKind
	reason      Reason
	linger      LingerEnd
	op          Op         // the operation Next returned and no step has followed yet
	owner       ownerClose // what became of the owner's Close
	abortAsked  bool
	inStep      bool // a step is running: requests need no wake-up
	flushing    bool // the flush clock runs: sendSince is set
	paused      bool // the handler paused reading
	held        bool // the handler holds the connection after the peer's FIN
	idleReset   bool // reading resumed: the idle clock restarts at the next step
	lingerReset bool // a held half-close became a close: the linger starts at the next step
	full        bool // a Write was refused for lack of room: OnDrain is owed
	notified    bool // OnClose was called
	lastTasks   bool // the tasks run for the last time: Do refuses more
	debug       bool // the logger logs transitions: see debugEnabled
	hookOff     bool // Config.OnStateChange panicked: it is not called again

	pending atomic.Bool // a request waits for the driver's next step

	conn  Conn
	sh    *shared     // the Config's limits, hooks and logger, shared by its connections
	cold  *engineCold // tasks, the abort's cause, the tagged logger: allocated on first use
	h     Handler
	waker func(Op)
	info  ConnInfo

	// The clocks: start is the time of the first step (Start's, once the
	// connection starts); the others are offsets from it, taken with
	// time.Time.Sub, so they keep the monotonic clock's meaning. A
	// deadline offset of zero means none: every bound is positive.
	start      time.Time
	now        time.Duration // the time of the step in progress
	recvSince  time.Duration // Receiving entered, input read, or reading resumed: idle base
	sendSince  time.Duration // the flush began: write deadline base
	halfAt     time.Duration // HalfClosed entered: LingerTime base
	lastLinger time.Duration // last read while HalfClosed: LingerTimeout base
	rateFrom   time.Duration // the MinRate window began (its first input), if rateIn > 0
	rateIn     int64         // input read in the MinRate window; zero: no window
	flushTo    int64         // bytesOut at which the flush begun at sendSince ends

	out    []byte // queued output; out[outOff:] is not yet written
	outOff int

	bytesIn, bytesOut, discarded, lingerRead int64
}

// handlerCaps records which optional interfaces a Handler implements, so
// that the engine holds one Handler, not one interface value per callback;
// the callback asserts the interface when it calls it.
type handlerCaps uint8

const (
	capOpen handlerCaps = 1 << iota
	capPeer
	capClose
	capDrain
	capFlush
)

// engineCold is the state few connections need: allocated by the first
// that does (Conn.Do, an abort's cause, a log line), never on the echo path.
type engineCold struct {
	tasks []func(*Conn) // queued by Conn.Do
	err   error         // the cause of an abort
	log   *slog.Logger  // the logger tagged with the connection; built on first use
}

// coldState returns e.cold, allocating it on first use.
func (e *Engine) coldState() *engineCold {
	if e.cold == nil {
		e.cold = new(engineCold)
	}
	return e.cold
}

// hasTasks reports whether Conn.Do queued tasks not yet run.
func (e *Engine) hasTasks() bool { return e.cold != nil && len(e.cold.tasks) > 0 }

// abortErr returns the cause of an abort recorded so far.
func (e *Engine) abortErr() error {
	if e.cold == nil {
		return nil
	}
	return e.cold.err
}

// at returns the absolute time of the clock offset off: zero for zero
// (no deadline).
func (e *Engine) at(off time.Duration) time.Time {
	if off == 0 {
		return time.Time{}
	}
	return e.start.Add(off)
}

// NewEngine returns an engine in Accepted for one connection, having
// called cfg.OnAccept. It returns an error matching ErrInvalidConfig if cfg
// is invalid. cfg.MaxConns is ignored.
func NewEngine(cfg Config, h Handler, info ConnInfo) (*Engine, error) {
	e := &Engine{}
	if err := e.Init(cfg, h, info); err != nil {
		return nil, err
	}
	return e, nil
}

// Init prepares e, a zero Engine, for one connection, as NewEngine does: for
// a driver that keeps the Engine inside its own per-connection struct and so
// saves an allocation per connection (Server's driver does). It returns the
// errors NewEngine returns. Call it once, before any other method, and do
// not copy e afterwards.
func (e *Engine) Init(cfg Config, h Handler, info ConnInfo) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if h == nil {
		return ErrNoHandler
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	e.conn.e = e
	e.sh = sharedFor(cfg.limits(), &cfg, log)
	e.h = h
	if _, ok := h.(OpenHandler); ok {
		e.caps |= capOpen
	}
	if _, ok := h.(PeerCloseHandler); ok {
		e.caps |= capPeer
	}
	if _, ok := h.(CloseHandler); ok {
		e.caps |= capClose
	}
	if _, ok := h.(DrainHandler); ok {
		e.caps |= capDrain
	}
	if _, ok := h.(FlushHandler); ok {
		e.caps |= capFlush
	}
	e.info = info
	e.debug = e.debugEnabled()
	if cfg.OnAccept != nil {
		e.callOnAccept(cfg.OnAccept)
	}
	return nil
}

// callOnAccept calls Config.OnAccept; a panic there aborts the connection
// at its first step, as a panic in OnStateChange does.
func (e *Engine) callOnAccept(f func(ConnInfo)) {
	perr := func() (perr *PanicError) {
		defer func() {
			if r := recover(); r != nil {
				perr = &PanicError{Value: r, Stack: debug.Stack()}
			}
		}()
		f(e.info)
		return nil
	}()
	if perr != nil {
		e.mu.Lock()
		e.askAbort(ReasonHandlerPanic, perr)
		e.mu.Unlock()
	}
}

// SetWaker sets the function a request calls when the driver must wake
// from the operation it is blocked in, which it is given: a read or a wait
// for any request, a handshake (OpStart) for a close or an abort, a write or
// a half-close for an abort. wake is called from the requesting goroutine
// with no lock held; it must not block and must not call the Engine. Set it
// before the first step.
func (e *Engine) SetWaker(wake func(op Op)) {
	e.mu.Lock()
	e.waker = wake
	e.mu.Unlock()
}

// Logger returns the connection's logger: Config.Logger (slog.Default()
// if nil) tagged with the connection's id and remote address.
func (e *Engine) Logger() *slog.Logger {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.logger()
}

// logger returns the connection's logger, tagged with its id and remote
// address; it is built on first use, so a connection that logs nothing
// pays nothing for it.
func (e *Engine) logger() *slog.Logger {
	c := e.coldState()
	if c.log == nil {
		base := e.sh.log
		if base == nil {
			base = discardLogger
		}
		c.log = connLogger(base, e.info)
	}
	return c.log
}

// discardLogger logs nothing.
var discardLogger = slog.New(discardHandler{})

// debugEnabled reports whether the logger logs at debug level. Each step
// asks it once, rather than fire once per transition: the logger's level
// can change at run time (slog.LevelVar).
//
//go:noinline
func (e *Engine) debugEnabled() bool {
	return e.sh.log != nil && e.sh.log.Enabled(context.Background(), slog.LevelDebug)
}

// discardHandler is a slog.Handler that drops everything.
type discardHandler struct{}

func (discardHandler) Enabled(context.Context, slog.Level) bool  { return false }
func (discardHandler) Handle(context.Context, slog.Record) error { return nil }
func (h discardHandler) WithAttrs([]slog.Attr) slog.Handler      { return h }
func (h discardHandler) WithGroup(string) slog.Handler           { return h }

// State returns the connection's lifecycle state.
func (e *Engine) State() fsm.State {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.m.State()
}

// Info identifies the connection.
func (e *Engine) Info() ConnInfo { return e.info }

// Conn returns the handler's view of the connection, which any goroutine
// may use.
func (e *Engine) Conn() *Conn { return &e.conn }

// Pending reports whether a request (from a Conn method, Close or Abort)
// waits for the driver's next step. A driver checks it after arming an
// operation's deadline and before blocking in it: a request that came
// before the deadline was armed may have had its wake-up overwritten.
func (e *Engine) Pending() bool { return e.pending.Load() }

// beginStep starts a step at now: the lock is held until endStep.
func (e *Engine) beginStep(now time.Time) {
	e.mu.Lock()
	e.inStep = true
	if e.start.IsZero() {
		e.start = now
	}
	e.now = now.Sub(e.start)
	e.op = 0
	e.debug = e.debugEnabled()
}

// endStep applies the state-triggered rules and ends the step.
func (e *Engine) endStep() {
	e.settle()
	e.inStep = false
	e.pending.Store((e.hasTasks() || e.owner == ownerAsked) && !e.notified)
	e.mu.Unlock()
}

// settle runs the tasks queued by Conn.Do and fires the state-triggered
// rules of the fsm package until none applies.
func (e *Engine) settle() {
	// The tasks queued so far run now; those they or other goroutines
	// queue meanwhile wait for the next step (endStep leaves them pending),
	// so that a flood of Do cannot keep the driver from its timers, its
	// aborts and the server's deadline.
	e.runTasks()
	if lim := &e.sh.lim; lim.lifetime > 0 && e.now >= lim.lifetime {
		// MaxLifetime asks for a graceful close, in any state, as a
		// server's shutdown does: writes are refused from now on, so a
		// connection that is kept busy still ends.
		if st := e.m.State(); st == fsm.Receiving || st == fsm.Sending {
			e.askClose(closeFull, ReasonMaxLifetime)
		}
	}
	for range maxSettle {
		if e.owner == ownerAsked {
			// The owner's close takes effect after the step's own work
			// (a handler answering input that arrived with it still may
			// write), and after a task or a hook that made it. A
			// connection that has read nothing yet is not idle but new:
			// its first input is likely on its way, so the close waits
			// for it, for FirstInputGrace at most (see Close).
			e.owner = ownerNone
			if e.m.State() == fsm.Receiving && e.bytesIn == 0 && e.now < FirstInputGrace {
				e.owner = ownerFirst
			} else {
				e.askClose(closeFull, ReasonShutdown)
			}
		}
		if e.owner == ownerFirst && (e.bytesIn > 0 || e.now >= FirstInputGrace || e.m.State() != fsm.Receiving) {
			e.owner = ownerNone
			e.askClose(closeFull, ReasonShutdown)
		}
		if e.idleReset {
			e.idleReset = false
			e.recvSince = e.now
		}
		if e.lingerReset {
			// The application of a held connection closed after its
			// half-close: the linger starts now.
			e.lingerReset = false
			e.halfAt, e.lastLinger, e.lingerRead = e.now, e.now, 0
		}
		e.rateCheck()
		ev, cause, ok := e.m.Due(e.facts())
		if !ok {
			return
		}
		e.because(ev, cause)
		e.fire(ev)
	}
	e.internal(errors.New("sockfsm: the state-triggered rules did not settle"))
}

// runTasks runs the tasks queued by Conn.Do so far, in order.
func (e *Engine) runTasks() {
	if e.hasTasks() && !e.notified {
		tasks := e.cold.tasks
		e.cold.tasks = nil
		for i, f := range tasks {
			tasks[i] = nil
			e.callTask(f)
		}
	}
}

// facts computes what the rules read.
func (e *Engine) facts() fsm.Cond {
	var c fsm.Cond
	if e.abortAsked {
		c |= fsm.IfAbortAsked
	}
	if e.closeKind != closeNone {
		c |= fsm.IfCloseAsked
	}
	if len(e.out) > e.outOff {
		c |= fsm.IfOutputQueued
	}
	if dl, _ := e.deadline(); dl != 0 && e.now >= dl {
		c |= fsm.IfTimer
	}
	if lb := e.sh.lim.lingerBytes; lb > 0 && e.lingerRead >= lb && e.lingerBounded() {
		c |= fsm.IfLingerBytes
	}
	if e.held {
		c |= fsm.IfHeld
	}
	if e.rateIn > 0 && e.rateActive() && e.now >= e.rateFrom+e.sh.lim.rateWindow && e.rateIn < e.sh.lim.rateBytes {
		c |= fsm.IfMinRate
	}
	return c
}

// because records what a state-triggered event means for CloseInfo: the
// reason, the cause and how the linger ended. It decides nothing.
func (e *Engine) because(ev fsm.Event, cause fsm.Cond) {
	switch ev {
	case fsm.Abort:
		if cause&fsm.IfAbortAsked == 0 { // the flush's timer
			e.setAbortReason(ReasonWriteTimeout, ErrWriteTimeout)
		}
		e.abortAsked = false
		e.dropOutput()
	case fsm.HalfClose:
		switch {
		case cause&fsm.IfCloseAsked != 0:
			// The request recorded its reason.
		case cause&fsm.IfPeerFIN != 0:
			e.setReason(ReasonPeerClosed)
			e.closeKind = closeFull
		default: // a receive timer, or MinRate
			if _, t := e.deadline(); cause&fsm.IfTimer == 0 {
				e.setReason(ReasonMinRate)
			} else if t == timerLifetime {
				e.setReason(ReasonMaxLifetime)
			} else {
				e.setReason(ReasonIdleTimeout)
			}
			e.closeKind = closeFull
		}
	case fsm.Close:
		switch {
		case e.m.State() != fsm.HalfClosed:
		case cause&fsm.IfPeerFIN != 0:
			// LingerEndPeerFIN was recorded if the FIN came while lingering.
		case cause&fsm.IfLingerBytes != 0:
			e.linger = LingerEndBytes
		default:
			if _, t := e.deadline(); t == timerLingerTimeout {
				e.linger = LingerEndTimeout
			} else {
				e.linger = LingerEndTime
			}
		}
	}
}

func (e *Engine) setReason(r Reason) {
	if e.reason == ReasonNone {
		e.reason = r
	}
}

// setAbortReason records the cause of an abort: it replaces a graceful
// reason, not an earlier abort's.
func (e *Engine) setAbortReason(r Reason, err error) {
	if !e.reason.Abortive() {
		e.reason = r
		e.coldState().err = err
	}
}

// mayClose reports whether the connection can still be closed or aborted:
// it has not decided to close yet.
func (e *Engine) mayClose() bool {
	switch e.m.State() {
	case fsm.Closing, fsm.Aborting, fsm.Closed:
		return false
	}
	return true
}

// askAbort records an abort for the rules to take.
func (e *Engine) askAbort(r Reason, err error) {
	if !e.mayClose() {
		return
	}
	e.setAbortReason(r, err)
	e.abortAsked = true
}

// askClose records a graceful close of the given kind: a full close
// overrides a half-close; the first reason given is kept. It reports
// whether the request changed anything, and ErrClosed once the connection
// is being closed or aborted.
func (e *Engine) askClose(k closeKind, r Reason) (bool, error) {
	if !e.mayClose() || e.abortAsked {
		return false, ErrClosed
	}
	if k <= e.closeKind {
		return false, nil
	}
	if e.held && e.closeKind == closeHalf && e.m.State() == fsm.HalfClosed {
		e.lingerReset = true // the linger was not running: see lingerBounded
	}
	e.closeKind = k
	e.setReason(r)
	return true, nil
}

// fire applies ev: the one place the state changes (smoltcp's set_state).
// An illegal event is an engine bug; the connection is aborted with
// ReasonInternal.
func (e *Engine) fire(ev fsm.Event) bool {
	from, err := e.m.Fire(ev)
	if err != nil {
		e.internal(err)
		return false
	}
	to := e.m.State()
	switch {
	case to == fsm.Receiving && (from != fsm.Receiving || ev == fsm.Input):
		e.recvSince = e.now
	case to == fsm.HalfClosed && from != fsm.HalfClosed:
		e.halfAt, e.lastLinger = e.now, e.now
	case ev == fsm.PeerFIN && from == fsm.HalfClosed:
		e.linger = LingerEndPeerFIN
	case to == fsm.Sending:
		e.flushing = false // the flush clock starts at the next Next
	}
	if e.sh.onChange != nil && !e.hookOff {
		e.notifyChange(from, to, ev)
	}
	if e.debug {
		e.logTransition(from, to, ev)
	}
	return true
}

// notifyChange calls Config.OnStateChange, with the lock released. It and
// logTransition are kept out of fire, whose frame is on the path from the
// driver to the handler: the deeper that path, the likelier a connection's
// goroutine grows its stack (TestIdleConnectionStack).
//
//go:noinline
func (e *Engine) notifyChange(from, to fsm.State, ev fsm.Event) {
	e.mu.Unlock()
	perr := e.invokeHook(from, to, ev)
	e.mu.Lock()
	if perr != nil {
		e.hookOff = true // it would panic again
		e.askAbort(ReasonHandlerPanic, perr)
	}
}

func (e *Engine) invokeHook(from, to fsm.State, ev fsm.Event) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	e.sh.onChange(e.info, from, to, ev)
	return nil
}

//go:noinline
func (e *Engine) logTransition(from, to fsm.State, ev fsm.Event) {
	e.logger().LogAttrs(context.Background(), slog.LevelDebug, "state change",
		slog.String("from", from.String()), slog.String("to", to.String()), slog.String("event", ev.String()))
}

// internal records an engine bug and aborts, if the connection can still be
// aborted.
func (e *Engine) internal(err error) {
	if e.reason != ReasonInternal {
		e.reason = ReasonInternal
		e.coldState().err = err
	}
	if e.mayClose() {
		e.dropOutput()
		e.abortAsked = false
		e.fire(fsm.Abort) // legal from every state mayClose allows, so this cannot recurse
	}
}

// keepOutput is the largest output buffer kept between flushes; a larger
// one is released so that one large response does not pin its memory for
// the rest of the connection's life.
const keepOutput = 64 << 10

func (e *Engine) dropOutput() {
	if cap(e.out) > keepOutput {
		e.out = nil
	}
	e.out = e.out[:0]
	e.outOff = 0
	e.flushing = false
}

// compactOutput moves the unwritten output to the front of the queue once
// the written part is large, so that a queue that writers keep from
// draining does not grow. It runs in WriteDone, when no write holds
// Action.Data.
func (e *Engine) compactOutput() {
	if e.outOff < 4<<10 || e.outOff < len(e.out)/2 {
		return
	}
	n := copy(e.out, e.out[e.outOff:])
	e.out = e.out[:n]
	e.outOff = 0
}

// wakeFor says which operations in flight a request must wake the driver
// from.
type wakeFor uint8

const (
	wakeRead  wakeFor = iota // a read or a wait: for more output, a resume, a task
	wakeClose                // and a handshake: for a close
	wakeAbort                // and a write or a half-close: for an abort
)

// request ends a request: it marks it pending and returns the operation
// the waker must interrupt (after the lock is released), or zero.
func (e *Engine) request(k wakeFor) Op {
	if e.inStep || e.waker == nil {
		if !e.inStep {
			e.pending.Store(true)
		}
		return 0 // the step in progress settles it
	}
	e.pending.Store(true)
	switch e.op {
	case OpRead, OpWait:
		return e.op
	case OpStart:
		if k >= wakeClose {
			return e.op
		}
	case OpWrite, OpCloseWrite:
		if k == wakeAbort {
			return e.op
		}
	}
	return 0
}

// wake calls the waker to interrupt op, if any. The lock must not be held.
func (e *Engine) wake(op Op) {
	if op != 0 {
		e.waker(op)
	}
}

// Close asks for a graceful close on behalf of the engine's owner (a
// server shutting down): queued output is flushed, then the engine
// half-closes, lingers and closes; input read after it is discarded. The
// reason is ReasonShutdown. Safe from any goroutine; it takes effect at the
// end of the driver's next step, so a handler still answers input that
// arrived with it, and output queued until then is flushed before our FIN.
// It returns ErrClosed if the connection is already being closed (Closing,
// Aborting, Closed) or an abort was asked for; otherwise a second call is
// harmless.
//
// A connection that has read nothing yet, younger than FirstInputGrace, is
// new rather than idle: its first request is likely in flight (a client
// that connected as the server began to shut down, or to the old process
// of a zero-downtime restart). Its close waits for that input, which is
// then answered and flushed as for a busy connection, or for
// FirstInputGrace from its start, whichever comes first. net/http's
// Shutdown gives new connections the same grace (5s there).
func (e *Engine) Close() error {
	e.mu.Lock()
	var err error
	var wake Op
	switch {
	case !e.mayClose() || e.abortAsked:
		err = ErrClosed
	case e.closeKind != closeFull && e.owner != ownerAsked:
		e.owner = ownerAsked
		wake = e.request(wakeClose)
	}
	e.mu.Unlock()
	e.wake(wake)
	return err
}

// Abort asks for the connection to be closed with RST at once; queued
// output is dropped. The reason is the one err names with a sentinel error
// of this package (ErrShutdownDeadline: ReasonShutdownDeadline,
// ErrHandshake: ReasonHandshake, ErrPeerReset, ErrWriteTimeout, ErrIO,
// ErrHandlerPanic, ErrAborted), and ReasonAborted for any other cause; err
// is reported in CloseInfo.Err. A driver reports a failed TLS handshake with
// Abort(errors.Join(ErrHandshake, err)). Safe from any goroutine; the
// driver's next step takes it.
func (e *Engine) Abort(err error) {
	r := abortReason(err)
	if r == ReasonAborted {
		err = errors.Join(ErrAborted, err)
	}
	e.mu.Lock()
	e.askAbort(r, err)
	wake := e.request(wakeAbort)
	e.mu.Unlock()
	e.wake(wake)
}

// abortReason returns the reason err names.
func abortReason(err error) Reason {
	switch {
	case err == nil:
		return ReasonAborted
	case errors.Is(err, ErrShutdownDeadline):
		return ReasonShutdownDeadline
	case errors.Is(err, ErrHandshake):
		return ReasonHandshake
	case errors.Is(err, ErrPeerReset):
		return ReasonPeerReset
	case errors.Is(err, ErrWriteTimeout):
		return ReasonWriteTimeout
	case errors.Is(err, ErrHandlerPanic):
		return ReasonHandlerPanic
	case errors.Is(err, ErrIO):
		return ReasonWriteError
	}
	return ReasonAborted
}

// Start starts the connection at now: it fires start and calls the
// handler's OnOpen. A connection asked to abort before it started is
// aborted instead. It does nothing after the first call.
func (e *Engine) Start(now time.Time) {
	e.beginStep(now)
	if e.m.State() == fsm.Accepted && !e.abortAsked {
		e.start, e.now = now, 0
		if e.fire(fsm.Start) && e.caps&capOpen != 0 {
			e.callback(cbOpen)
		}
	}
	e.endStep()
}

// FirstInputGrace is how long the owner's close (Close: a server's
// Shutdown) waits for the first input of a connection that has read
// nothing yet, counted from the connection's start.
const FirstInputGrace = time.Second

// Next returns the operation the driver must perform next. It fires no
// event: it only starts the flush clock when it first hands out a write, so
// that the time the handler took to produce the output does not count
// against WriteTimeout.
func (e *Engine) Next(now time.Time) Action {
	e.mu.Lock()
	st := e.m.State()
	a := Action{Op: st.Op()}
	switch a.Op {
	case OpRead:
		// A paused handler stops reading; so does a lingering one that
		// asked for a half-close (it still takes input). After the peer's
		// FIN there is nothing to read: a held connection waits for its
		// handler to close it.
		if (e.paused && (st == fsm.Receiving || e.closeKind == closeHalf)) || e.m.PeerFIN() {
			a.Op = OpWait
		}
		a.Deadline = e.at(e.wakeAt())
	case OpWrite:
		if !e.flushing {
			e.flushing, e.sendSince = true, now.Sub(e.start)
			e.flushTo = e.bytesOut + int64(len(e.out)-e.outOff)
		}
		a.Data = e.out[e.outOff:len(e.out):len(e.out)]
		a.Deadline = e.at(e.wakeAt())
	}
	e.op = a.Op
	e.mu.Unlock()
	return a
}

// Timeout returns the engine's next deadline, zero if none: when it
// passes, the driver calls HandleTimeout (a read or write that stops at it
// reports ResultTimeout instead). It fires nothing. In Sending the flush
// clock starts at Next, so ask after Next.
func (e *Engine) Timeout() time.Time {
	e.mu.Lock()
	dl := e.at(e.wakeAt())
	e.mu.Unlock()
	return dl
}

// wakeAt is when the engine must next act: the deadline of the current
// state; while Sending, MaxLifetime if that comes first (it asks for a
// close; the flush goes on); while Receiving, the end of the MinRate window
// if that comes first (the window is judged; it is no timer of the state).
func (e *Engine) wakeAt() time.Duration {
	dl, _ := e.deadline()
	lim := &e.sh.lim
	if lim.lifetime > 0 && e.m.State() == fsm.Sending && e.closeKind != closeFull {
		if l := lim.lifetime; dl == 0 || l < dl {
			dl = l
		}
	}
	if e.rateIn > 0 && e.rateActive() {
		if r := e.rateFrom + lim.rateWindow; dl == 0 || r < dl {
			dl = r
		}
	}
	if e.owner == ownerFirst && (dl == 0 || FirstInputGrace < dl) {
		dl = FirstInputGrace
	}
	return dl
}

// rateActive reports whether input counts towards MinRate now: while
// Receiving, reading, with no output waiting on the peer and no FIN from
// it. Anything else ends the window.
func (e *Engine) rateActive() bool {
	return e.m.State() == fsm.Receiving && !e.paused && !e.m.PeerFIN() && len(e.out) == e.outOff
}

// rateCheck ends the MinRate window when input stops counting, or when
// the window is over and brought MinRate×MinRateWindow bytes: the next
// input starts the next one. A window over and short stays, for facts.
func (e *Engine) rateCheck() {
	if e.rateIn == 0 {
		return
	}
	if !e.rateActive() || (e.now >= e.rateFrom+e.sh.lim.rateWindow && e.rateIn >= e.sh.lim.rateBytes) {
		e.rateFrom, e.rateIn = 0, 0
	}
}

// lingerBounded reports whether the linger bounds apply in HalfClosed.
// They do, except after a held connection's half-close: its application
// still reads, as from a net.Conn after CloseWrite, and ends the connection
// with its own Close, from which the linger and its bounds start.
func (e *Engine) lingerBounded() bool { return !(e.held && e.closeKind == closeHalf) }

// deadline returns the deadline of the current state and which timer it
// is.
func (e *Engine) deadline() (time.Duration, timer) {
	lim := &e.sh.lim
	switch e.m.State() {
	case fsm.Receiving:
		var dl time.Duration
		t := timerNone
		if lim.idle > 0 && !e.paused {
			dl, t = e.recvSince+lim.idle, timerIdle
		}
		if lim.lifetime > 0 {
			if l := lim.lifetime; dl == 0 || l < dl {
				dl, t = l, timerLifetime
			}
		}
		return dl, t
	case fsm.Sending:
		if e.flushing {
			return e.sendSince + lim.write, timerWrite
		}
		return 0, timerNone
	case fsm.HalfClosed:
		if !e.lingerBounded() {
			return 0, timerNone
		}
		dl, t := e.halfAt+lim.lingerTime, timerLingerTime
		if lim.lingerTimeout > 0 {
			if l := e.lastLinger + lim.lingerTimeout; l < dl {
				dl, t = l, timerLingerTimeout
			}
		}
		return dl, t
	}
	return 0, timerNone
}

// HandleTimeout handles what is due at now: the deadlines that have passed
// and the requests made since the last step (from Conn's methods, Close and
// Abort). Call it when the deadline of Timeout passes, when the waker was
// called, and when Pending reports true before blocking.
func (e *Engine) HandleTimeout(now time.Time) {
	e.beginStep(now)
	e.endStep()
}

// ReadDone reports the result of OpRead: the bytes read (the driver's
// buffer may be reused once ReadDone returns), and how the read ended.
// err is the transport's error, kept as the cause of an abort.
func (e *Engine) ReadDone(now time.Time, p []byte, r Result, err error) {
	e.beginStep(now)
	if st := e.m.State(); st == fsm.Receiving || st == fsm.HalfClosed {
		if len(p) > 0 {
			e.input(p)
		}
		if r != ResultOK && r != ResultTimeout {
			e.readEnded(r, err)
		}
	}
	e.endStep()
}

// readEnded handles the end of input: the peer's FIN, its reset or an
// error. It is kept out of ReadDone, whose frame is on the path from the
// driver to the handler's OnData.
//
//go:noinline
func (e *Engine) readEnded(r Result, err error) {
	switch r {
	case ResultEOF:
		if e.m.Can(fsm.PeerFIN) {
			e.fire(fsm.PeerFIN)
			if e.caps&capPeer != 0 {
				e.callback(cbPeerClose)
			}
		}
	case ResultReset:
		e.askAbort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
	default:
		e.askAbort(ReasonReadError, errors.Join(ErrIO, err))
	}
}

func (e *Engine) input(p []byte) {
	n := int64(len(p))
	if !e.fire(fsm.Input) {
		return
	}
	e.bytesIn += n
	if e.sh.lim.rateWindow > 0 && e.rateActive() {
		if e.rateIn == 0 {
			e.rateFrom = e.now
		}
		e.rateIn += n
	}
	if e.m.State() == fsm.HalfClosed {
		e.lingerRead += n
		e.lastLinger = e.now
		if e.closeKind == closeFull {
			e.discarded += n
			return
		}
	}
	e.callData(p)
}

// WriteDone reports the result of OpWrite: how many bytes were written and
// how the write ended. A write cut short by its deadline or a wake-up
// reports ResultTimeout with the bytes it wrote; the engine resumes from
// there, or aborts if its own write deadline has passed.
func (e *Engine) WriteDone(now time.Time, n int, r Result, err error) {
	e.beginStep(now)
	if e.m.State() == fsm.Sending {
		n = max(0, min(n, len(e.out)-e.outOff))
		e.outOff += n
		e.bytesOut += int64(n)
		if e.outOff == len(e.out) {
			e.dropOutput()
			e.fire(fsm.Flushed)
			if e.full {
				e.full = false
				if e.caps&capDrain != 0 {
					e.callback(cbDrain)
				}
			}
			if e.caps&capFlush != 0 {
				e.callback(cbFlush)
			}
		} else {
			if e.bytesOut >= e.flushTo {
				// The bytes queued when the flush began are out: what
				// was queued since (pushed from another goroutine) is a
				// flush of its own, with a WriteTimeout of its own. A
				// peer still has to read MaxPendingOutput bytes per
				// WriteTimeout.
				e.sendSince = now.Sub(e.start)
				e.flushTo = e.bytesOut + int64(len(e.out)-e.outOff)
			}
			e.compactOutput()
			switch r {
			case ResultOK, ResultTimeout, ResultEOF:
			case ResultReset:
				e.askAbort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
			default:
				e.askAbort(ReasonWriteError, errors.Join(ErrIO, err))
			}
		}
	}
	e.endStep()
}

// CloseWriteDone reports the result of OpCloseWrite.
func (e *Engine) CloseWriteDone(now time.Time, r Result, err error) {
	e.beginStep(now)
	if e.m.State() == fsm.HalfClosing {
		switch r {
		case ResultOK:
			e.fire(fsm.FINSent)
		case ResultReset:
			e.askAbort(ReasonPeerReset, errors.Join(ErrPeerReset, err))
		default:
			e.askAbort(ReasonWriteError, errors.Join(ErrIO, err))
		}
	}
	e.endStep()
}

// CloseDone reports that OpClose or OpAbort was performed: the transport
// is closed. The connection enters Closed; the tasks still queued by
// Conn.Do run; then the handler's OnClose and Config.OnClose are called,
// once.
func (e *Engine) CloseDone(now time.Time) {
	e.beginStep(now)
	if st := e.m.State(); st == fsm.Closing || st == fsm.Aborting {
		e.fire(fsm.CloseDone)
	}
	if e.m.State() == fsm.Closed && !e.notified {
		// Every task Do accepted runs, before OnClose; from here on Do
		// refuses new ones, so a task that queues another cannot keep
		// the connection from ending.
		e.lastTasks = true
		e.runTasks()
		e.notified = true
		if e.cold != nil {
			e.cold.tasks = nil
		}
		if e.caps&capClose != 0 {
			e.callClose()
		}
		if e.sh.onClose != nil {
			e.callOnCloseHook()
		}
		e.logClose()
	}
	e.endStep()
}

// CloseInfo says how the connection ended, or how it stands so far.
func (e *Engine) CloseInfo() CloseInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closeInfo()
}

func (e *Engine) closeInfo() CloseInfo {
	return CloseInfo{
		Reason:       e.reason,
		Err:          e.abortErr(),
		Linger:       e.linger,
		PeerFIN:      e.m.PeerFIN(),
		BytesRead:    e.bytesIn,
		BytesWritten: e.bytesOut,
		Discarded:    e.discarded,
		Duration:     e.now,
	}
}

// The handler's callbacks. They run with the lock released, so that they
// may call Conn's methods; a panic aborts the connection.

type cbKind uint8

const (
	cbOpen cbKind = iota
	cbPeerClose
	cbDrain
	cbFlush
)

// callback calls the handler with the lock released. The frames on the
// path from the driver to the handler's OnData are kept small (callData,
// invokeData): a connection's goroutine that outgrows its initial 2 KiB
// stack keeps 4 KiB for good (TestIdleConnectionStack).
func (e *Engine) callback(k cbKind) {
	e.mu.Unlock()
	perr := e.invoke(k)
	e.mu.Lock()
	if perr != nil {
		e.askAbort(ReasonHandlerPanic, perr)
	}
}

//go:noinline
func (e *Engine) invoke(k cbKind) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	switch k {
	case cbOpen:
		e.h.(OpenHandler).OnOpen(&e.conn)
	case cbPeerClose:
		e.h.(PeerCloseHandler).OnPeerClose(&e.conn)
	case cbDrain:
		e.h.(DrainHandler).OnDrain(&e.conn)
	case cbFlush:
		e.h.(FlushHandler).OnFlush(&e.conn)
	}
	return nil
}

// callData calls the handler's OnData with the lock released.
func (e *Engine) callData(p []byte) {
	e.mu.Unlock()
	perr := e.invokeData(p)
	e.mu.Lock()
	if perr != nil {
		e.askAbort(ReasonHandlerPanic, perr)
	}
}

//go:noinline
func (e *Engine) invokeData(p []byte) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	e.h.OnData(&e.conn, p)
	return nil
}

// callClose calls the handler's OnClose with the lock released; a panic
// there is logged, since the connection is closed already.
//
//go:noinline
func (e *Engine) callClose() {
	info := e.closeInfo()
	e.mu.Unlock()
	perr := e.invokeClose(&info)
	e.mu.Lock()
	if perr != nil {
		e.logger().Error("handler panic in OnClose", "panic", perr.Value, "stack", string(perr.Stack))
	}
}

func (e *Engine) invokeClose(info *CloseInfo) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	e.h.(CloseHandler).OnClose(&e.conn, *info)
	return nil
}

// callTask runs a task queued by Conn.Do, as a callback.
func (e *Engine) callTask(f func(*Conn)) {
	e.mu.Unlock()
	perr := e.invokeTask(f)
	e.mu.Lock()
	if perr != nil {
		e.askAbort(ReasonHandlerPanic, perr)
	}
}

func (e *Engine) invokeTask(f func(*Conn)) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	f(&e.conn)
	return nil
}

func (e *Engine) callOnCloseHook() {
	info := e.closeInfo()
	e.mu.Unlock()
	perr := e.invokeOnClose(info)
	e.mu.Lock()
	if perr != nil {
		e.logger().Error("panic in Config.OnClose", "panic", perr.Value, "stack", string(perr.Stack))
	}
}

func (e *Engine) invokeOnClose(info CloseInfo) (perr *PanicError) {
	defer func() {
		if r := recover(); r != nil {
			perr = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	e.sh.onClose(e.info, info)
	return nil
}

// logClose logs how the connection ended. A graceful close is logged only
// at debug level, so the connection's tagged logger is not even built for
// it unless that level is on.
//
//go:noinline
func (e *Engine) logClose() {
	ctx := context.Background()
	info := e.closeInfo()
	switch {
	case errors.Is(info.Err, ErrHandlerPanic):
		var pe *PanicError
		errors.As(info.Err, &pe)
		stack := ""
		if pe != nil {
			stack = string(pe.Stack)
		}
		e.logger().Error("handler panic: connection aborted", "err", info.Err, "stack", stack)
	case info.Reason.Abortive():
		e.logger().LogAttrs(ctx, slog.LevelInfo, "connection aborted",
			slog.String("reason", info.Reason.String()), slog.Any("err", info.Err),
			slog.Int64("read", info.BytesRead), slog.Int64("written", info.BytesWritten))
	case e.debug:
		e.logger().LogAttrs(ctx, slog.LevelDebug, "connection closed",
			slog.String("reason", info.Reason.String()), slog.String("linger", info.Linger.String()),
			slog.Int64("read", info.BytesRead), slog.Int64("written", info.BytesWritten),
			slog.Int64("discarded", info.Discarded), slog.Duration("duration", info.Duration))
	}
}
