package fsm

import (
	"bytes"
	"errors"
	"flag"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite ../docs/state-diagram.md, ../docs/lifecycle.pml and the README's diagram from the table")

const diagramPath = "../docs/state-diagram.md"

// TestDiagramGolden fails when docs/state-diagram.md and the table disagree.
// TestReadmeDiagram fails when the diagram in README.md, between its
// diagram markers, and the table disagree; -update rewrites it.
func TestReadmeDiagram(t *testing.T) {
	const path = "../README.md"
	const begin, end = "<!-- diagram:begin -->\n", "<!-- diagram:end -->"
	readme, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i, j := bytes.Index(readme, []byte(begin)), bytes.Index(readme, []byte(end))
	if i < 0 || j < i {
		t.Fatalf("%s has no %q ... %q block", path, begin, end)
	}
	i += len(begin)
	if string(readme[i:j]) == Mermaid() {
		return
	}
	if !*update {
		t.Fatalf("the diagram in %s is stale: run go test ./fsm -update", path)
	}
	fixed := append(append(append([]byte{}, readme[:i]...), Mermaid()...), readme[j:]...)
	if err := os.WriteFile(path, fixed, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDiagramGolden(t *testing.T) {
	got := Markdown()
	if *update {
		if err := os.WriteFile(diagramPath, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(diagramPath)
	if err != nil {
		t.Fatalf("%v (run go test ./fsm -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is stale: run go test ./fsm -update", diagramPath)
	}
}

// expected is the lifecycle written out by hand, independently of table.go,
// so that an accidental edit of the table shows up here.
var expected = map[State]map[Event]State{
	Accepted:    {Start: Receiving, Close: Closing, Abort: Aborting},
	Receiving:   {Input: Receiving, Output: Sending, PeerFIN: Receiving, HalfClose: HalfClosing, Abort: Aborting},
	Sending:     {Flushed: Receiving, Abort: Aborting},
	HalfClosing: {FINSent: HalfClosed, Abort: Aborting},
	HalfClosed:  {Input: HalfClosed, PeerFIN: HalfClosed, Close: Closing, Abort: Aborting},
	Closing:     {CloseDone: Closed},
	Aborting:    {CloseDone: Closed},
	Closed:      {},
}

// expectedRules is the state-triggered rules written out by hand, as a
// function of the state and the facts, independently of table.go.
func expectedRule(s State, c Cond) (Event, bool) {
	abortable := s != Closing && s != Aborting && s != Closed
	switch {
	case abortable && c&IfAbortAsked != 0:
		return Abort, true
	case s == Accepted && c&IfCloseAsked != 0 && c&IfOutputQueued == 0:
		return Close, true
	case s == Receiving && c&IfOutputQueued != 0:
		return Output, true
	case s == Receiving && c&(IfCloseAsked|IfTimer|IfMinRate) != 0:
		return HalfClose, true
	case s == Receiving && c&IfPeerFIN != 0 && c&IfHeld == 0:
		return HalfClose, true
	case s == Sending && c&IfTimer != 0:
		return Abort, true
	case s == HalfClosed && c&(IfPeerFIN|IfTimer|IfLingerBytes) != 0:
		return Close, true
	}
	return 0, false
}

// TestRulesMatchExpected checks Due against expectedRule for every state
// and every combination of facts, and that the cause it returns is made of
// facts that were given and that the rule reads.
func TestRulesMatchExpected(t *testing.T) {
	for _, s := range States() {
		for c := Cond(0); c < 1<<numConds; c++ {
			ev, cause, ok := Due(s, c)
			wev, wok := expectedRule(s, c)
			if ok != wok || (ok && ev != wev) {
				t.Errorf("Due(%s, %s) = %s, %v; want %s, %v", s, c, ev, ok, wev, wok)
				continue
			}
			if !ok {
				continue
			}
			if cause == 0 || cause&^c != 0 || cause&IfHeld != 0 {
				t.Errorf("Due(%s, %s): cause %s is not a subset of the facts", s, c, cause)
			}
			if _, legal := Lookup(s, ev); !legal {
				t.Errorf("Due(%s, %s) fires %s, which is not an edge", s, c, ev)
			}
		}
	}
}

// TestMachineDueReadsPeerFIN: the machine adds its own peer-fin bit to the
// facts.
func TestMachineDueReadsPeerFIN(t *testing.T) {
	var m Machine
	m.Fire(Start)
	if _, _, ok := m.Due(0); ok {
		t.Fatal("a rule applies to a fresh Receiving machine with no facts")
	}
	m.Fire(PeerFIN)
	ev, cause, ok := m.Due(0)
	if !ok || ev != HalfClose || cause != IfPeerFIN {
		t.Fatalf("after the peer's FIN: Due = %s, %s, %v; want half-close, peer-fin", ev, cause, ok)
	}
}

// TestCompileRejectsRuleOffTable shows a rule that fires an event the table
// does not allow from its state does not compile.
func TestCompileRejectsRuleOffTable(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("compileRules accepted a rule off the table")
		}
	}()
	compileRules([]Rule{{From: []State{Sending}, When: IfCloseAsked, Fire: HalfClose}}, compiled)
}

func TestCondString(t *testing.T) {
	if got := (IfAbortAsked | IfTimer).String(); got != "abort-asked|timer" {
		t.Errorf("String = %q", got)
	}
	if got := Cond(0).String(); got != "none" {
		t.Errorf("String = %q", got)
	}
}

// TestEveryStateEventPair fires every event in every state, with and without
// the peer's FIN, against the Machine and the looplab reference.
func TestEveryStateEventPair(t *testing.T) {
	for _, s := range States() {
		for _, fin := range []bool{false, true} {
			for _, e := range Events() {
				m := Machine{state: s, peerFIN: fin}
				want, legal := expected[s][e]
				if fin && (e == Input || e == PeerFIN) {
					legal = false
				}
				if m.Can(e) != legal {
					t.Errorf("%s/%s fin=%v: Can = %v, want %v", s, e, fin, !legal, legal)
				}
				from, err := m.Fire(e)
				if from != s {
					t.Errorf("%s/%s fin=%v: Fire returned from=%s", s, e, fin, from)
				}
				if legal {
					if err != nil || m.State() != want {
						t.Errorf("%s --%s--> got %s, %v; want %s", s, e, m.State(), err, want)
					}
					if e == PeerFIN && !m.PeerFIN() {
						t.Errorf("%s --%s-->: PeerFIN not recorded", s, e)
					}
				} else {
					var te *TransitionError
					if !errors.As(err, &te) || !errors.Is(err, ErrInvalidTransition) {
						t.Errorf("%s --%s--> fin=%v: err = %v, want *TransitionError", s, e, fin, err)
						continue
					}
					if te.From != s || te.Event != e {
						t.Errorf("TransitionError = %+v, want From=%s Event=%s", te, s, e)
					}
					if m.State() != s || m.PeerFIN() != fin {
						t.Errorf("%s --%s--> refused but changed the machine to %s fin=%v", s, e, m.State(), m.PeerFIN())
					}
					if !strings.HasPrefix(err.Error(), "sockfsm: ") {
						t.Errorf("error %q lacks the sockfsm: prefix", err)
					}
				}

				// The looplab reference, put in the same state, agrees.
				ref := NewReference()
				ref.SetState(s.String())
				if fin {
					ref.SetMetadata(peerFINKey, true)
				}
				rerr := Step(ref, e)
				if (rerr == nil) != legal {
					t.Errorf("looplab reference: %s --%s--> fin=%v: err=%v, want legal=%v", s, e, fin, rerr, legal)
				}
				if legal && ref.Current() != want.String() {
					t.Errorf("looplab reference: %s --%s--> %s, want %s", s, e, ref.Current(), want)
				}
			}
		}
	}
}

func TestTransitionsMatchExpected(t *testing.T) {
	n := 0
	for _, tr := range Transitions() {
		if expected[tr.From][tr.Event] != tr.To {
			t.Errorf("unexpected edge %+v", tr)
		}
		n++
	}
	want := 0
	for _, m := range expected {
		want += len(m)
	}
	if n != want {
		t.Errorf("%d edges, want %d", n, want)
	}
}

// TestEveryStateReachableAndClosedReachable checks the table's shape: every
// state is reachable from Accepted, and Closed is reachable from every state.
func TestEveryStateReachableAndClosedReachable(t *testing.T) {
	reach := func(from State) map[State]bool {
		seen := map[State]bool{from: true}
		queue := []State{from}
		for len(queue) > 0 {
			s := queue[0]
			queue = queue[1:]
			for _, tr := range Transitions() {
				if tr.From == s && !seen[tr.To] {
					seen[tr.To] = true
					queue = append(queue, tr.To)
				}
			}
		}
		return seen
	}
	fromStart := reach(Accepted)
	for _, s := range States() {
		if !fromStart[s] {
			t.Errorf("%s unreachable from Accepted", s)
		}
		if !reach(s)[Closed] {
			t.Errorf("Closed unreachable from %s", s)
		}
		for _, e := range Events() {
			if _, ok := Lookup(Closed, e); ok {
				t.Errorf("Closed is not terminal: %s leaves it", e)
			}
		}
	}
}

// TestStateDocsMatchTable checks each State constant's doc comment: its
// "May go to:" list equals the table's destinations.
func TestStateDocsMatchTable(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "fsm.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	docs := map[string]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		if vs, ok := n.(*ast.ValueSpec); ok && vs.Doc != nil {
			for _, name := range vs.Names {
				docs[name.Name] = vs.Doc.Text()
			}
		}
		return true
	})
	re := regexp.MustCompile(`May go to: ([^.]*)\.`)
	for _, s := range States() {
		doc := strings.Join(strings.Fields(docs[goName(s.String())]), " ")
		m := re.FindStringSubmatch(doc)
		if m == nil {
			t.Errorf("doc comment of %s has no \"May go to:\" line", goName(s.String()))
			continue
		}
		var got []string
		if m[1] != "nothing" {
			for _, d := range strings.Split(m[1], ",") {
				got = append(got, strings.TrimSpace(d))
			}
		}
		var want []string
		for _, tr := range Transitions() {
			if tr.From == s && !slices.Contains(want, goName(tr.To.String())) {
				want = append(want, goName(tr.To.String()))
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s doc says it may go to %v; the table says %v", goName(s.String()), got, want)
		}
		if strings.Contains(doc, "terminal") != s.Terminal() {
			t.Errorf("%s doc and Terminal() disagree", s)
		}
	}
}

func TestNamesRoundTrip(t *testing.T) {
	for _, s := range States() {
		if p, ok := ParseState(s.String()); !ok || p != s {
			t.Errorf("ParseState(%q) = %v, %v", s, p, ok)
		}
	}
	for _, e := range Events() {
		if p, ok := ParseEvent(e.String()); !ok || p != e {
			t.Errorf("ParseEvent(%q) = %v, %v", e, p, ok)
		}
	}
	if State(99).String() != "State(99)" || Event(99).String() != "Event(99)" {
		t.Error("out-of-range names")
	}
	var m Machine
	if _, err := m.Fire(Event(99)); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("unknown event: %v", err)
	}
}

// TestCompileRejectsDuplicates shows a table with the same edge twice does not compile.
func TestCompileRejectsDuplicates(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("compile accepted a duplicate edge")
		}
	}()
	compile(append(slices.Clone(table), table[0]))
}

func BenchmarkFire(b *testing.B) {
	b.ReportAllocs()
	var m Machine
	m.Fire(Start)
	for b.Loop() {
		m.Fire(Input)
	}
}

func BenchmarkLooplabReference(b *testing.B) {
	b.ReportAllocs()
	ref := NewReference()
	Step(ref, Start)
	for b.Loop() {
		Step(ref, Output)
		Step(ref, Flushed)
		Step(ref, Input)
	}
}
