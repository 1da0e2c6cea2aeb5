// Package fsm defines the lifecycle of one sockfsm connection:
//
//	Accepted → Receiving ⇄ Sending → HalfClosing → HalfClosed → Closing → Closed
//	                                   (any state before Closing) → Aborting → Closed
//
// The lifecycle is declared once, as data, in table.go: the edges (with
// github.com/looplab/fsm's declaration), the guard (the peer's FIN), and the
// state-triggered rules that decide when the engine fires an event of its
// own: a close was asked for and nothing is left to flush, our FIN is out
// and the peer's FIN or a linger bound is there, a timer passed. The engine
// computes the facts the rules read (Cond) and fires what Due returns; it
// decides nothing else.
//
// Everything else is derived from that data: the compiled lookup array that
// Machine uses on the hot path, the looplab reference machine returned by
// NewReference, the list of legal edges (Transitions) and rules (Rules) the
// tests check against, and docs/state-diagram.md (Markdown).
//
// Each state means what is true of the socket: HalfClosed from the moment
// our FIN was handed to the transport, Closed from the moment the transport
// was closed. HalfClosing, Closing and Aborting are the moments between a
// decision and the operation that makes it true.
//
// Like h11's state machine, an illegal event returns an error and changes
// nothing.
package fsm

import (
	"errors"
	"fmt"
	"strings"
)

// State is a connection's lifecycle state. The zero value is Accepted.
type State uint8

// The lifecycle states. Each comment's "May go to" line is checked against
// the table by TestStateDocsMatchTable.
const (
	// Accepted is the state of a connection the engine has been given but
	// not started. May go to: Receiving, Closing, Aborting.
	Accepted State = iota

	// Receiving waits for input; nothing is pending to send. Input that
	// arrives goes to the handler. May go to: Receiving, Sending,
	// HalfClosing, Aborting.
	Receiving

	// Sending flushes output the handler queued; no input is read until
	// the flush completes. May go to: Receiving, Aborting.
	Sending

	// HalfClosing means the engine has decided to half-close and is
	// handing our FIN to the transport (CloseWrite); nothing more is
	// written. May go to: HalfClosed, Aborting.
	HalfClosing

	// HalfClosed means our FIN was handed to the transport (shutdown(SD_SEND),
	// CloseWrite) and we may still receive: the engine lingers, reading
	// until the peer's FIN within bounds, before it closes. Nothing is ever
	// written in this state. May go to: HalfClosed, Closing, Aborting.
	HalfClosed

	// Closing means the engine has decided to close gracefully and the
	// transport's Close is under way. May go to: Closed.
	Closing

	// Aborting means the engine has decided to abort and the transport's
	// Abort (RST) is under way. May go to: Closed.
	Aborting

	// Closed is terminal: the transport has been closed, gracefully or by
	// abort. May go to: nothing.
	Closed

	numStates = iota
)

// Event is something that happens to a connection.
type Event uint8

// The lifecycle events.
const (
	// Start begins reading from a new connection.
	Start Event = iota
	// Input is a chunk of input read from the peer.
	Input
	// Output: the handler queued output, to be flushed.
	Output
	// Flushed means all queued output reached the transport.
	Flushed
	// PeerFIN is end of file from the peer: it half-closed its side.
	PeerFIN
	// HalfClose is the decision to half-close: our FIN is next.
	HalfClose
	// FINSent: the transport's CloseWrite returned; our FIN is out.
	FINSent
	// Close is the decision to close gracefully.
	Close
	// Abort is the decision to close abortively (RST).
	Abort
	// CloseDone: the transport's Close or Abort returned.
	CloseDone

	numEvents = iota
)

// Op is an I/O operation the driver performs for a connection: what it
// does in each state (State.Op).
type Op uint8

// The operations. sockfsm's Engine hands them out with Next; its
// documentation says how the driver reports each one's result.
const (
	// OpStart: run the transport's handshake, if any, then start.
	OpStart Op = iota + 1
	// OpRead: read, within the state's deadline.
	OpRead
	// OpWait: the handler paused reading: wait for the deadline or a
	// wake-up, without I/O.
	OpWait
	// OpWrite: write queued output, within the flush's deadline.
	OpWrite
	// OpCloseWrite: half-close the transport: our FIN.
	OpCloseWrite
	// OpClose: close the transport gracefully.
	OpClose
	// OpAbort: abort the transport (RST).
	OpAbort
	// OpDone: nothing more: the connection is closed.
	OpDone

	numOps = iota + 1
)

// String returns the operation's name.
func (o Op) String() string {
	if o != 0 && int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Op returns what the driver does in state s (OpRead for a read the
// handler may pause into OpWait).
func (s State) Op() Op {
	if int(s) < numStates {
		return stateOps[s]
	}
	return 0
}

// Cond is a set of facts about a connection that the state-triggered rules
// read. The engine computes them; the rules decide what they mean.
type Cond uint16

// The facts.
const (
	// IfAbortAsked: an abort was asked for and not yet taken.
	IfAbortAsked Cond = 1 << iota
	// IfCloseAsked: a graceful close or half-close was asked for.
	IfCloseAsked
	// IfOutputQueued: output is queued and not yet handed to the transport.
	IfOutputQueued
	// IfPeerFIN: the peer's FIN was read (the Machine's own guard bit).
	IfPeerFIN
	// IfTimer: the deadline of the current state has passed: IdleTimeout
	// or MaxLifetime while Receiving, WriteTimeout while Sending,
	// LingerTimeout or LingerTime while HalfClosed.
	IfTimer
	// IfLingerBytes: LingerBytes were read while HalfClosed.
	IfLingerBytes
	// IfHeld: the handler holds the connection open after the peer's FIN
	// (Conn.Hold) and closes it itself, as the user of a net.Conn does.
	IfHeld
	// IfMinRate: the peer's input over the last window of MinRateWindow
	// while Receiving (reading, nothing to flush, no FIN from the peer)
	// was some, but less than MinRate: a peer that trickles.
	IfMinRate

	numConds = iota
)

// ErrInvalidTransition is matched by every *TransitionError.
var ErrInvalidTransition = errors.New("sockfsm: invalid transition")

// TransitionError reports an event that is illegal in the current state.
// The machine that returned it is unchanged.
type TransitionError struct {
	From    State
	Event   Event
	PeerFIN bool // the event was refused by the PeerFIN guard
}

// Error implements error.
func (e *TransitionError) Error() string {
	if e.PeerFIN {
		return fmt.Sprintf("sockfsm: invalid transition: event %s in state %s after the peer's FIN", e.Event, e.From)
	}
	return fmt.Sprintf("sockfsm: invalid transition: event %s in state %s", e.Event, e.From)
}

// Is reports whether target is ErrInvalidTransition.
func (e *TransitionError) Is(target error) bool { return target == ErrInvalidTransition }

// String returns the state's name as used in the table.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Terminal reports whether s is Closed.
func (s State) Terminal() bool { return s == Closed }

// String returns the event's name as used in the table.
func (e Event) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// String returns the facts' names joined by "|", or "none".
func (c Cond) String() string {
	if c == 0 {
		return "none"
	}
	var parts []string
	for i := range numConds {
		if c&(1<<i) != 0 {
			parts = append(parts, condNames[i])
		}
	}
	if rest := c &^ (1<<numConds - 1); rest != 0 {
		parts = append(parts, fmt.Sprintf("Cond(%#x)", uint16(rest)))
	}
	return strings.Join(parts, "|")
}

// States returns every state, in lifecycle order.
func States() []State {
	s := make([]State, numStates)
	for i := range s {
		s[i] = State(i)
	}
	return s
}

// Events returns every event, in declaration order.
func Events() []Event {
	e := make([]Event, numEvents)
	for i := range e {
		e[i] = Event(i)
	}
	return e
}

// Conds returns every single fact, in declaration order.
func Conds() []Cond {
	c := make([]Cond, numConds)
	for i := range c {
		c[i] = 1 << i
	}
	return c
}

// Machine is one connection's lifecycle state. The zero value is a machine in
// Accepted. It is not safe for concurrent use; the engine owns it.
type Machine struct {
	state   State
	peerFIN bool
}

// State returns the current state.
func (m *Machine) State() State { return m.state }

// PeerFIN reports whether the peer's FIN has been seen.
func (m *Machine) PeerFIN() bool { return m.peerFIN }

// Can reports whether ev is legal now.
func (m *Machine) Can(ev Event) bool {
	_, ok := m.next(ev)
	return ok
}

// Fire applies ev. It returns the state before the event. If ev is illegal
// it returns a *TransitionError and the machine is unchanged.
func (m *Machine) Fire(ev Event) (from State, err error) {
	to, ok := m.next(ev)
	if !ok {
		return m.state, &TransitionError{From: m.state, Event: ev, PeerFIN: m.peerFIN && refusedAfterPeerFIN(ev)}
	}
	from = m.state
	m.state = to
	if ev == PeerFIN {
		m.peerFIN = true
	}
	return from, nil
}

// Due returns the event the state-triggered rules fire now, given the facts
// c (IfPeerFIN is added from the machine itself), and the facts that made
// the rule apply. ok is false when no rule applies.
func (m *Machine) Due(c Cond) (ev Event, cause Cond, ok bool) {
	if m.peerFIN {
		c |= IfPeerFIN
	}
	return Due(m.state, c)
}

// Due returns the event the rules fire in state s given the facts c, and
// the facts that made the rule apply. ok is false when no rule applies.
func Due(s State, c Cond) (ev Event, cause Cond, ok bool) {
	if int(s) >= numStates {
		return 0, 0, false
	}
	for _, r := range compiledRules[s] {
		if hit := r.when & c; hit != 0 && r.unless&c == 0 {
			return r.fire, hit, true
		}
	}
	return 0, 0, false
}

func (m *Machine) next(ev Event) (State, bool) {
	if int(ev) >= numEvents || int(m.state) >= numStates {
		return 0, false
	}
	if m.peerFIN && refusedAfterPeerFIN(ev) {
		return 0, false
	}
	to := compiled[m.state][ev]
	return to, to != noState
}

// Transition is one edge of the table.
type Transition struct {
	From  State
	Event Event
	To    State
}

// Transitions returns every edge of the table, ordered by source state and
// then by event.
func Transitions() []Transition {
	var ts []Transition
	for s := range State(numStates) {
		for e := range Event(numEvents) {
			if to := compiled[s][e]; to != noState {
				ts = append(ts, Transition{From: s, Event: e, To: to})
			}
		}
	}
	return ts
}

// Rules returns a copy of the state-triggered rules, in the order they are
// tried.
func Rules() []Rule {
	out := make([]Rule, len(rules))
	for i, r := range rules {
		r.From = append([]State(nil), r.From...)
		out[i] = r
	}
	return out
}

// Guarded returns the events the peer's FIN refuses.
func Guarded() []Event { return append([]Event(nil), guardedByPeerFIN...) }

// Lookup returns the table's destination for ev in state from, ignoring the
// PeerFIN guard, and whether the table has that edge.
func Lookup(from State, ev Event) (State, bool) {
	if int(from) >= numStates || int(ev) >= numEvents {
		return 0, false
	}
	to := compiled[from][ev]
	return to, to != noState
}

func refusedAfterPeerFIN(ev Event) bool {
	for _, g := range guardedByPeerFIN {
		if g == ev {
			return true
		}
	}
	return false
}
