package fsm

import (
	"context"
	"errors"
	"fmt"

	lfsm "github.com/looplab/fsm"
)

// This file is the whole lifecycle: the states and events, the edges
// (table), the guard (guardedByPeerFIN) and the state-triggered rules
// (rules). In the words of h11's _state.py, everything that affects the
// state machine lives here. The engine computes the facts that the rules
// read (Cond), fires the events its driver reports, and fires what the rules
// say; it decides nothing else. Machine, the looplab reference, the diagram
// in docs/state-diagram.md and the tests are derived from this data.

// stateNames and eventNames are the names the table uses.
var (
	stateNames = [numStates]string{"accepted", "receiving", "sending", "half-closing", "half-closed", "closing", "aborting", "closed"}
	eventNames = [numEvents]string{"start", "input", "output", "flushed", "peer-fin", "half-close", "fin-sent", "close", "abort", "close-done"}
	opNames    = [numOps]string{"", "start", "read", "wait", "write", "close-write", "close", "abort", "done"}
	condNames  = [numConds]string{"abort-asked", "close-asked", "output-queued", "peer-fin", "timer", "linger-bytes", "held", "min-rate"}
)

// table is the lifecycle's edges, declared once.
var table = lfsm.Events{
	{Name: "start", Src: []string{"accepted"}, Dst: "receiving"},
	{Name: "input", Src: []string{"receiving"}, Dst: "receiving"},
	// Lingering reads: the input goes to a handler that asked for a
	// half-close, or is discarded.
	{Name: "input", Src: []string{"half-closed"}, Dst: "half-closed"},
	{Name: "output", Src: []string{"receiving"}, Dst: "sending"},
	{Name: "flushed", Src: []string{"sending"}, Dst: "receiving"},
	{Name: "peer-fin", Src: []string{"receiving"}, Dst: "receiving"},
	{Name: "peer-fin", Src: []string{"half-closed"}, Dst: "half-closed"},
	{Name: "half-close", Src: []string{"receiving"}, Dst: "half-closing"},
	{Name: "fin-sent", Src: []string{"half-closing"}, Dst: "half-closed"},
	{Name: "close", Src: []string{"half-closed"}, Dst: "closing"},
	// A connection that never started (the server shut down during its TLS
	// handshake) has read and written nothing: it closes without lingering.
	{Name: "close", Src: []string{"accepted"}, Dst: "closing"},
	{Name: "abort", Src: []string{"accepted", "receiving", "sending", "half-closing", "half-closed"}, Dst: "aborting"},
	{Name: "close-done", Src: []string{"closing", "aborting"}, Dst: "closed"},
}

// stateOps is what the driver does in each state: the operation the
// engine's Next hands out (a paused read is a wait).
var stateOps = [numStates]Op{
	Accepted:    OpStart,
	Receiving:   OpRead,
	Sending:     OpWrite,
	HalfClosing: OpCloseWrite,
	HalfClosed:  OpRead,
	Closing:     OpClose,
	Aborting:    OpAbort,
	Closed:      OpDone,
}

// guardedByPeerFIN lists the events refused once the peer's FIN was seen:
// a peer that has sent FIN can send neither input nor another FIN.
var guardedByPeerFIN = []Event{Input, PeerFIN}

// Rule is a state-triggered transition: in any state of From, when any of
// the facts in When holds and none of those in Unless, the engine fires
// Fire. Rules are tried in order; the first that applies wins. Why says
// why, for the docs.
type Rule struct {
	From   []State
	When   Cond
	Unless Cond
	Fire   Event
	Why    string
}

// rules are the state-triggered transitions. The engine fires the first
// that applies after every event and every request, until none does. An
// abort comes first; then output queued by the handler; then the close.
var rules = []Rule{
	{
		From: []State{Accepted, Receiving, Sending, HalfClosing, HalfClosed},
		When: IfAbortAsked,
		Fire: Abort,
		Why:  "an abort was asked for: by Conn.Abort, Engine.Abort, the server's deadline, or a driver that saw a reset, an I/O error or a failed handshake",
	},
	{
		From:   []State{Accepted},
		When:   IfCloseAsked,
		Unless: IfOutputQueued,
		Fire:   Close,
		Why:    "a close was asked for before the connection started (its TLS handshake was interrupted): nothing was read or written. A connection with output queued starts instead, so that its output is flushed before our FIN",
	},
	{
		From: []State{Receiving},
		When: IfOutputQueued,
		Fire: Output,
		Why:  "the handler queued output, from a callback or from another goroutine",
	},
	{
		From: []State{Receiving},
		When: IfCloseAsked | IfTimer | IfMinRate,
		Fire: HalfClose,
		Why:  "nothing is left to flush and a close was asked for, or IdleTimeout or MaxLifetime passed, or the peer's input over a window stayed below MinRate",
	},
	{
		From:   []State{Receiving},
		When:   IfPeerFIN,
		Unless: IfHeld,
		Fire:   HalfClose,
		Why:    "the peer's FIN was read and the handler's answer is flushed: no socket is left in CLOSE_WAIT. A handler that holds the connection (the net.Conn face) closes it itself",
	},
	{
		From: []State{Sending},
		When: IfTimer,
		Fire: Abort,
		Why:  "the flush did not finish within WriteTimeout: the peer does not read",
	},
	{
		From: []State{HalfClosed},
		When: IfPeerFIN | IfTimer | IfLingerBytes,
		Fire: Close,
		Why:  "our FIN is out and the peer's FIN was read, or a linger bound was reached: LingerTimeout, LingerTime or LingerBytes",
	},
}

// noState marks a missing edge in compiled.
const noState State = 0xff

// compiled is table as an array, built once at init. Machine uses it so that
// a transition is an index, not a map lookup or an allocation.
var compiled = compile(table)

func compile(evs lfsm.Events) [numStates][numEvents]State {
	var c [numStates][numEvents]State
	for s := range c {
		for e := range c[s] {
			c[s][e] = noState
		}
	}
	for _, d := range evs {
		e := mustParseEvent(d.Name)
		to := mustParseState(d.Dst)
		for _, src := range d.Src {
			from := mustParseState(src)
			if c[from][e] != noState {
				panic(fmt.Sprintf("fsm: table declares %s from %s twice", d.Name, src))
			}
			c[from][e] = to
		}
	}
	return c
}

// compiledRules is rules indexed by state, checked against the table at
// init: every rule's event must be an edge from each of its states.
var compiledRules = compileRules(rules, compiled)

type stateRule struct {
	when, unless Cond
	fire         Event
}

func compileRules(rs []Rule, c [numStates][numEvents]State) [numStates][]stateRule {
	var out [numStates][]stateRule
	for _, r := range rs {
		for _, s := range r.From {
			if c[s][r.Fire] == noState {
				panic(fmt.Sprintf("fsm: rule fires %s from %s, which the table does not allow", r.Fire, s))
			}
			out[s] = append(out[s], stateRule{r.When, r.Unless, r.Fire})
		}
	}
	return out
}

// ParseState returns the State named name.
func ParseState(name string) (State, bool) {
	for i, n := range stateNames {
		if n == name {
			return State(i), true
		}
	}
	return 0, false
}

// ParseEvent returns the Event named name.
func ParseEvent(name string) (Event, bool) {
	for i, n := range eventNames {
		if n == name {
			return Event(i), true
		}
	}
	return 0, false
}

func mustParseState(name string) State {
	s, ok := ParseState(name)
	if !ok {
		panic("fsm: table names unknown state " + name)
	}
	return s
}

func mustParseEvent(name string) Event {
	e, ok := ParseEvent(name)
	if !ok {
		panic("fsm: table names unknown event " + name)
	}
	return e
}

// peerFINKey is the looplab metadata key that records the peer's FIN.
const peerFINKey = "peer-fin"

// errGuard is the reason the reference machine cancels a guarded event.
var errGuard = errors.New("sockfsm: refused after the peer's FIN")

// NewReference returns a looplab/fsm machine in Accepted built from the same
// table and the same PeerFIN guard (as before_ callbacks that cancel). It is
// the reference the engine's transitions are checked against; it is slow
// (maps, allocations) and not used on the hot path.
//
// Use Step to apply an event to it with this package's error conventions.
func NewReference() *lfsm.FSM {
	cbs := lfsm.Callbacks{
		"after_peer-fin": func(_ context.Context, e *lfsm.Event) {
			e.FSM.SetMetadata(peerFINKey, true)
		},
	}
	for _, ev := range guardedByPeerFIN {
		cbs["before_"+ev.String()] = func(_ context.Context, e *lfsm.Event) {
			if v, _ := e.FSM.Metadata(peerFINKey); v == true {
				e.Cancel(errGuard)
			}
		}
	}
	return lfsm.NewFSM(Accepted.String(), table, cbs)
}

// Step applies ev to a reference machine from NewReference. It returns nil
// when looplab accepts the event (a self-loop, which looplab reports as
// NoTransitionError, is accepted) and an error when looplab refuses it.
func Step(ref *lfsm.FSM, ev Event) error {
	err := ref.Event(context.Background(), ev.String())
	var nt lfsm.NoTransitionError
	if errors.As(err, &nt) && nt.Err == nil {
		return nil
	}
	return err
}
