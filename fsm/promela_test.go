package fsm

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/internal/testutil"
)

const promelaPath = "../docs/lifecycle.pml"

// TestPromelaGolden fails when docs/lifecycle.pml and the table disagree;
// go test ./fsm -update rewrites it.
func TestPromelaGolden(t *testing.T) {
	got := Promela()
	if *update {
		if err := os.WriteFile(promelaPath, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(promelaPath)
	if err != nil {
		t.Fatalf("%v (run go test ./fsm -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is stale: run go test ./fsm -update", promelaPath)
	}
}

// TestPromelaFromTable checks that the model says what the table says:
// one lookup line per edge, the guard, each state's operation, each rule
// in order, and a definition of every fact.
func TestPromelaFromTable(t *testing.T) {
	pml := string(Promela())
	for _, tr := range Transitions() {
		line := fmt.Sprintf(":: st == %s && ev == %s -> nst = %s\n", pState(tr.From), pEvent(tr.Event), pState(tr.To))
		if strings.Count(pml, line) != 1 {
			t.Errorf("the model has %d lookup lines for %s --%s--> %s, want 1", strings.Count(pml, line), tr.From, tr.Event, tr.To)
		}
	}
	if got, want := len(regexp.MustCompile(`:: st == \w+ && ev == \w+ -> nst = `).FindAllString(pml, -1)), len(Transitions()); got != want {
		t.Errorf("the model has %d lookup lines, want %d, one per edge", got, want)
	}
	for _, e := range Guarded() {
		if !regexp.MustCompile(`peerfin && \([^)]*ev == ` + pEvent(e) + `\b`).MatchString(pml) {
			t.Errorf("the model does not guard %s", e)
		}
	}
	for _, s := range States() {
		if line := fmt.Sprintf(":: st == %s -> op = %s\n", pState(s), pOp(s.Op())); !strings.Contains(pml, line) {
			t.Errorf("the model lacks %q", line)
		}
	}
	at := 0
	for i, r := range Rules() {
		want := fmt.Sprintf("%s && (facts & (%s)) != 0", pIn(r.From), pConds(r.When))
		if r.Unless != 0 {
			want += fmt.Sprintf(" && (facts & (%s)) == 0", pConds(r.Unless))
		}
		want += fmt.Sprintf(" ->\n%sev = %s;", strings.Repeat("\t", i+2), pEvent(r.Fire))
		j := strings.Index(pml[at:], want)
		if j < 0 {
			t.Errorf("rule %d (%s) is not in the model, in order: want %q", i+1, r.Fire, want)
			continue
		}
		at += j
	}
	for _, c := range Conds() {
		if !strings.Contains(pml, fmt.Sprintf("#define %-15s %d\n", pCond(c), c)) {
			t.Errorf("the model does not define %s", c)
		}
		if _, ok := promelaFacts[c]; !ok {
			t.Errorf("promelaFacts does not say how the engine computes %s", c)
		}
	}
}

// promelaVariant is a broken lifecycle: the model of the table with one
// thing changed, and the claim spin must find false on it.
type promelaVariant struct {
	name   string
	claim  string
	breaks func(*lifecycle)
	// engine, if set, also edits the model's engine part (the replacement
	// must apply).
	engine [2]string
}

// promelaVariants break the table, one thing each, so that every claim is
// shown to fail on some broken table.
var promelaVariants = []promelaVariant{
	{
		name:  "fin-sent leads to sending",
		claim: "fin_last",
		breaks: func(l *lifecycle) {
			l.redirect(HalfClosing, FINSent, Sending)
		},
	},
	{
		name:  "half-close fires from sending",
		claim: "fin_last",
		breaks: func(l *lifecycle) {
			l.edges = append(l.edges, Transition{From: Sending, Event: HalfClose, To: HalfClosing})
			i := l.rule(Sending, Abort, IfTimer)
			l.rules = slices.Insert(l.rules, i, Rule{From: []State{Sending}, When: IfCloseAsked, Fire: HalfClose})
		},
	},
	{
		name:  "no write deadline: timer dropped from the sending abort rule",
		claim: "closes",
		breaks: func(l *lifecycle) {
			l.rules[l.rule(Sending, Abort, IfTimer)].When &^= IfTimer
		},
	},
	{
		name:  "close-done fired twice: closing's close-done leads to aborting",
		claim: "closed_once",
		breaks: func(l *lifecycle) {
			l.redirect(Closing, CloseDone, Aborting)
		},
	},
	{
		name:  "fin-sent edge removed",
		claim: "no_rst_graceful",
		breaks: func(l *lifecycle) {
			l.remove(HalfClosing, FINSent)
		},
	},
	{
		name:  "abort skips aborting: it leads straight to closed",
		claim: "on_close_once",
		breaks: func(l *lifecycle) {
			for i, tr := range l.edges {
				if tr.Event == Abort {
					l.edges[i].To = Closed
				}
			}
		},
	},
	{
		name:  "linger-bytes dropped from the half-closed close rule",
		claim: "linger_bytes",
		breaks: func(l *lifecycle) {
			l.rules[l.rule(HalfClosed, Close, IfLingerBytes)].When &^= IfLingerBytes
		},
	},
	{
		// The guard alone is unreachable: Next hands out no read after the
		// peer's FIN. This variant also undoes that, as the engine was
		// before Conn.Hold: a held connection reads EOF again.
		name:  "guard dropped, and the engine reads after the peer's FIN",
		claim: "peer_fin_once",
		breaks: func(l *lifecycle) {
			l.guarded = nil
		},
		engine: [2]string{"|| peerfin) -> op = opWait", ") -> op = opWait"},
	},
}

// rule returns the index of the rule that fires ev from s when c holds.
func (l *lifecycle) rule(s State, ev Event, c Cond) int {
	for i, r := range l.rules {
		if r.Fire == ev && r.When&c != 0 && slices.Contains(r.From, s) {
			return i
		}
	}
	panic(fmt.Sprintf("no rule fires %s from %s on %s", ev, s, c))
}

func (l *lifecycle) edge(from State, ev Event) int {
	for i, tr := range l.edges {
		if tr.From == from && tr.Event == ev {
			return i
		}
	}
	panic(fmt.Sprintf("no edge %s from %s", ev, from))
}

func (l *lifecycle) redirect(from State, ev Event, to State) { l.edges[l.edge(from, ev)].To = to }

func (l *lifecycle) remove(from State, ev Event) {
	l.edges = slices.Delete(l.edges, l.edge(from, ev), l.edge(from, ev)+1)
}

// model returns the variant's Promela model.
func (v promelaVariant) model(t *testing.T) []byte {
	l := tableLifecycle()
	l.edges = slices.Clone(l.edges)
	l.rules = slices.Clone(l.rules)
	v.breaks(&l)
	pml := l.promela()
	if v.engine[0] != "" {
		if !bytes.Contains(pml, []byte(v.engine[0])) {
			t.Fatalf("the model's engine has no %q to edit", v.engine[0])
		}
		pml = bytes.Replace(pml, []byte(v.engine[0]), []byte(v.engine[1]), 1)
	}
	return pml
}

func promelaClaimNames() []string {
	var names []string
	for _, c := range promelaClaims {
		names = append(names, c.name)
	}
	return names
}

// TestSpinVariantsCoverClaims: every claim has a broken table that spin
// must find it false on.
func TestSpinVariantsCoverClaims(t *testing.T) {
	for _, name := range promelaClaimNames() {
		if !slices.ContainsFunc(promelaVariants, func(v promelaVariant) bool { return v.claim == name }) {
			t.Errorf("no broken variant shows that claim %s can fail", name)
		}
	}
	for _, v := range promelaVariants {
		if !slices.Contains(promelaClaimNames(), v.claim) {
			t.Errorf("variant %q names no claim: %s", v.name, v.claim)
		}
	}
}

// spinResult is spin's verdict on one claim.
type spinResult struct {
	claim  string
	errors int
	states string // states stored, visited
	cpu    time.Duration
	wall   time.Duration
	trail  string // the counterexample, when errors > 0
}

var (
	spinErrors = regexp.MustCompile(`errors: (\d+)`)
	spinStates = regexp.MustCompile(`(?m)^\s*(\d+) states, stored(?: \(([\d.e+]+) visited\))?`)
)

// spinCheck writes pml to a new directory, builds its verifier (spin -a,
// cc with optimization opt) and checks each claim with ./pan -a -f:
// acceptance cycles under weak fairness. It fails the test if a search
// that found no error was incomplete.
func spinCheck(t *testing.T, pml []byte, opt string, claims []string) []spinResult {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "lifecycle.pml"), pml, 0o644); err != nil {
		t.Fatal(err)
	}
	// run runs a tool in dir and returns its output and the CPU time it
	// took (the wall clock of a loaded machine says little).
	run := func(name string, args ...string) (string, time.Duration) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out), cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	start := time.Now()
	_, cpuSpin := run("spin", "-a", "lifecycle.pml")
	_, cpuCC := run("cc", opt, "-DNFAIR=3", "-o", "pan", "pan.c")
	t.Logf("spin -a and cc %s: %v CPU, %v wall", opt, (cpuSpin + cpuCC).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	var rs []spinResult
	for _, claim := range claims {
		os.Remove(filepath.Join(dir, "lifecycle.pml.trail"))
		start := time.Now()
		out, cpu := run("./pan", "-a", "-f", "-m100000", "-w20", "-N", claim)
		r := spinResult{claim: claim, cpu: cpu, wall: time.Since(start)}
		m := spinErrors.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("pan -N %s: no error count in its output:\n%s", claim, out)
		}
		r.errors, _ = strconv.Atoi(m[1])
		if r.errors == 0 && (strings.Contains(out, "max search depth too small") || strings.Contains(out, "Search not completed")) {
			t.Fatalf("pan -N %s: the search was not complete:\n%s", claim, out)
		}
		if m := spinStates.FindStringSubmatch(out); m != nil {
			r.states = m[1] + " states"
			if m[2] != "" {
				r.states += ", " + m[2] + " visited"
			}
		}
		if r.errors > 0 {
			out, _ := run("spin", "-t", "lifecycle.pml")
			r.trail = spinTrail(out)
		}
		rs = append(rs, r)
	}
	return rs
}

// spinTrail keeps what the model printed while spin replayed a
// counterexample (spin -t), the failed claim and the trail's length; the
// LTL formulas spin echoes first and the claim's moves are dropped.
func spinTrail(out string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(out, "\n") {
		if strings.HasPrefix(line, "ltl ") || strings.HasPrefix(line, "Never claim moves") {
			continue
		}
		if strings.HasPrefix(line, "#processes") {
			break
		}
		b.WriteString(line)
	}
	return b.String()
}

// TestSpin checks the claims with spin: each holds on the model of the
// table, and each fails on a broken table, whose counterexample is logged.
func TestSpin(t *testing.T) {
	testutil.Tool(t, "spin", "spin")
	testutil.Tool(t, "cc", "gcc")
	t.Run("table", func(t *testing.T) {
		t.Parallel()
		for _, r := range spinCheck(t, Promela(), "-O2", promelaClaimNames()) {
			if r.errors != 0 {
				t.Errorf("claim %s is false on the table; spin's counterexample:\n%s", r.claim, r.trail)
				continue
			}
			t.Logf("claim %s holds: %s, pan -a -f took %v CPU, %v wall", r.claim, r.states, r.cpu.Round(time.Millisecond), r.wall.Round(time.Millisecond))
		}
	})
	for _, v := range promelaVariants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			// A counterexample is found in a fraction of a second: the
			// verifier's compilation, not its speed, is what costs here.
			r := spinCheck(t, v.model(t), "-O0", []string{v.claim})[0]
			if r.errors == 0 {
				t.Fatalf("spin finds claim %s true on a broken table (%s): the claim does not bite", v.claim, v.name)
			}
			t.Logf("claim %s fails on %q, as it must (pan -a -f took %v CPU, %v wall); spin's counterexample:\n%s", v.claim, v.name, r.cpu.Round(time.Millisecond), r.wall.Round(time.Millisecond), r.trail)
		})
	}
}
