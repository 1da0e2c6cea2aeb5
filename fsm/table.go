package fsm

import (
	"context"
	"errors"
	"fmt"

	lfsm "github.com/looplab/fsm"
)

// stateNames and eventNames are the names the table uses.
var (
	stateNames = [numStates]string{"accepted", "receiving", "sending", "half-closed", "closed"}
	eventNames = [numEvents]string{"start", "input", "output", "flushed", "peer-fin", "half-close", "close", "abort"}
)

// table is the lifecycle, declared once. Everything else derives from it.
var table = lfsm.Events{
	{Name: "start", Src: []string{"accepted"}, Dst: "receiving"},
	{Name: "input", Src: []string{"receiving"}, Dst: "receiving"},
	{Name: "input", Src: []string{"half-closed"}, Dst: "half-closed"},
	{Name: "output", Src: []string{"receiving", "sending"}, Dst: "sending"},
	{Name: "flushed", Src: []string{"sending"}, Dst: "receiving"},
	{Name: "peer-fin", Src: []string{"receiving"}, Dst: "receiving"},
	// A read can return input and EOF together; the handler's answer to the
	// input has moved the machine to sending by the time EOF is seen.
	{Name: "peer-fin", Src: []string{"sending"}, Dst: "sending"},
	{Name: "peer-fin", Src: []string{"half-closed"}, Dst: "half-closed"},
	{Name: "half-close", Src: []string{"receiving"}, Dst: "half-closed"},
	{Name: "close", Src: []string{"half-closed"}, Dst: "closed"},
	// A connection that never started (the server shut down during its TLS
	// handshake) has read and written nothing: it closes without lingering.
	{Name: "close", Src: []string{"accepted"}, Dst: "closed"},
	{Name: "abort", Src: []string{"accepted", "receiving", "sending", "half-closed"}, Dst: "closed"},
}

// guardedByPeerFIN lists the events refused once the peer's FIN was seen:
// a peer that has sent FIN can send neither input nor another FIN.
var guardedByPeerFIN = []Event{Input, PeerFIN}

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
