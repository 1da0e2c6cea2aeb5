// Package fsm defines the lifecycle of one sockfsm connection:
//
//	Accepted → Receiving ⇄ Sending → HalfClosed → Closed
//
// The transition table is declared once, with github.com/looplab/fsm, in
// table.go. Everything else is derived from it: the compiled lookup array
// that Machine uses on the hot path, the looplab reference machine returned
// by NewReference, the list of legal edges the tests check against
// (Transitions), and docs/state-diagram.md (Markdown).
//
// Besides the state, a Machine tracks one bit of metadata: whether the
// peer's FIN has been seen (PeerFIN). It is set by the PeerFIN event and
// guards the events that need a peer that can still send: once it is set,
// Input and PeerFIN are illegal in every state.
//
// Like h11's state machine, an illegal event returns an error and changes
// nothing.
package fsm

import (
	"errors"
	"fmt"
)

// State is a connection's lifecycle state. The zero value is Accepted.
type State uint8

// The lifecycle states. Each comment's "May go to" line is checked against
// the table by TestStateDocsMatchTable.
const (
	// Accepted is the state of a connection the engine has been given but
	// not started. May go to: Receiving, Closed.
	Accepted State = iota

	// Receiving waits for input; nothing is pending to send. Input that
	// arrives goes to the handler. May go to: Receiving, Sending,
	// HalfClosed, Closed.
	Receiving

	// Sending flushes output the handler wrote; no input is read until
	// the flush completes. May go to: Receiving, Sending, Closed.
	Sending

	// HalfClosed means we have shut down our sending side (our FIN,
	// shutdown(SD_SEND), CloseWrite) and may still receive: the engine
	// lingers, reading until the peer's FIN within bounds, before it
	// closes. Nothing is ever written in this state. May go to:
	// HalfClosed, Closed.
	HalfClosed

	// Closed is terminal: the transport has been closed (gracefully or by
	// abort). May go to: nothing.
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
	// Output is output queued by the handler, to be flushed.
	Output
	// Flushed means all queued output reached the transport.
	Flushed
	// PeerFIN is end of file from the peer: it half-closed its side.
	PeerFIN
	// HalfClose is our half-close: the transport's CloseWrite, our FIN.
	HalfClose
	// Close is the graceful close of a half-closed connection.
	Close
	// Abort is an abortive close (RST) on an error, a reset, the write
	// timeout, an explicit abort or the shutdown deadline.
	Abort

	numEvents = iota
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
