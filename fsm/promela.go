package fsm

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
)

// This file generates docs/lifecycle.pml, a Promela model of the lifecycle
// for the spin model checker. The table's part of it (the states, events,
// edges, guard, rules and each state's operation) is generated from this
// package's exported data, so that it cannot drift from table.go; the
// engine's part (what its steps and requests do, engine.go and handler.go)
// and the environment (the peer, the timers, the handler, the server) are
// written out below, once. The claims at the end are what spin proves; see
// docs/model-check.md and promela_test.go.

// lifecycle is the data the Promela model is generated from. Promela fills
// it from the exported API; the tests break copies of it to show that each
// claim fails on a broken table.
type lifecycle struct {
	edges   []Transition
	rules   []Rule
	guarded []Event
	ops     []Op // indexed by State
}

// tableLifecycle returns the lifecycle declared in table.go, read through
// the exported API.
func tableLifecycle() lifecycle {
	l := lifecycle{edges: Transitions(), rules: Rules(), guarded: Guarded()}
	for _, s := range States() {
		l.ops = append(l.ops, s.Op())
	}
	return l
}

// Promela returns docs/lifecycle.pml: the lifecycle as a Promela model, with
// the engine, a nondeterministic environment and the LTL claims spin checks.
func Promela() []byte { return tableLifecycle().promela() }

// promelaClaim is one LTL claim of the model: a name for spin's -N, what
// it says, and the formula.
type promelaClaim struct {
	name, says, formula string
}

// promelaClaims are the model's LTL claims. $-names are the model's
// constants (see promelaNames).
var promelaClaims = []promelaClaim{
	{
		"fin_last",
		"our FIN is the last thing on the write side: no write is handed out after it (in a state past our half-close, or once CloseWrite was performed), and it goes only when no output is queued",
		"[] ((op == $opWrite -> (!fin_out && st != $HalfClosing && st != $HalfClosed && st != $Closing && st != $Aborting && st != $Closed)) && (op == $opCloseWrite -> !out_q))",
	},
	{
		"closes",
		"every run ends in Closed (weak fairness: a deadline that stays armed passes, the driver keeps going)",
		"<>[] (st == $Closed)",
	},
	{
		"closed_once",
		"Closed is entered once, and the transport closed (OpClose or OpAbort performed) once, before it",
		"[] (entered_closed <= 1 && closes <= 1 && (st == $Closed -> closes == 1))",
	},
	{
		"no_rst_graceful",
		"no RST on a graceful path: OpAbort is handed out only if an abort was asked for (the handler, the server, the driver's reset, I/O error or failed handshake) or the write deadline passed",
		"[] (op == $opAbort -> abort_cause)",
	},
	{
		"on_close_once",
		"OnClose is called exactly once, after close-done",
		"<> (notified == 1) && [] (notified <= 1 && (notified == 1 -> (st == $Closed && close_dones >= 1)))",
	},
	{
		"linger_bytes",
		"once LingerBytes were read after our FIN, no read is handed out",
		"[] !(op == $opRead && linger_full)",
	},
	{
		"peer_fin_once",
		"the peer's FIN is taken once (the handler hears OnPeerClose once)",
		"[] (peer_fins <= 1)",
	},
}

// promelaFacts says how the engine computes each fact (Engine.facts), as a
// Promela expression over the model's variables.
var promelaFacts = map[Cond]string{
	IfAbortAsked:   "abort_asked",
	IfCloseAsked:   "close_kind != closeNone",
	IfOutputQueued: "out_q",
	IfPeerFIN:      "peerfin",
	IfTimer:        "timer",
	IfLingerBytes:  "linger_full",
	IfHeld:         "held",
	IfMinRate:      "slow && !paused && !peerfin && !out_q",
}

// pState, pEvent, pOp and pCond are the model's names of a state, an
// event, an operation and a fact.
func pState(s State) string { return goName(s.String()) }
func pEvent(e Event) string { return "ev" + goName(e.String()) }
func pOp(o Op) string {
	if o == 0 {
		return "opNone"
	}
	return "op" + goName(o.String())
}
func pCond(c Cond) string { return "If" + goName(c.String()) }

// pConds is the Promela expression for the set of facts c.
func pConds(c Cond) string {
	var parts []string
	for _, f := range Conds() {
		if c&f != 0 {
			parts = append(parts, pCond(f))
		}
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, " | ")
}

// pIn is the Promela expression "st is one of ss".
func pIn(ss []State) string {
	var parts []string
	for _, s := range ss {
		parts = append(parts, "st == "+pState(s))
	}
	if len(parts) == 0 {
		return "false"
	}
	return "(" + strings.Join(parts, " || ") + ")"
}

// promelaNames maps the $-names of the hand-written parts (the engine, the
// environment, the claims) to the model's constants, from this package's
// own constants.
func promelaNames() *strings.Replacer {
	var pairs []string
	for _, s := range States() {
		pairs = append(pairs, "$"+goName(s.String()), pState(s))
	}
	for _, e := range Events() {
		pairs = append(pairs, "$"+pEvent(e), pEvent(e))
	}
	for o := Op(1); o < numOps; o++ {
		pairs = append(pairs, "$"+pOp(o), pOp(o))
	}
	// Longest first: $opClose must not match inside $opCloseWrite.
	type pair struct{ from, to string }
	var ps []pair
	for i := 0; i < len(pairs); i += 2 {
		ps = append(ps, pair{pairs[i], pairs[i+1]})
	}
	slices.SortStableFunc(ps, func(a, b pair) int { return len(b.from) - len(a.from) })
	pairs = pairs[:0]
	for _, p := range ps {
		pairs = append(pairs, p.from, p.to)
	}
	return strings.NewReplacer(pairs...)
}

// promela renders the model of l.
func (l lifecycle) promela() []byte {
	var b bytes.Buffer
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	names := promelaNames()

	w("/*\n")
	w(" * The lifecycle of a sockfsm connection as a Promela model, for spin.\n")
	w(" * Generated from fsm/table.go by `go test ./fsm -update`. Do not edit.\n")
	w(" * Checked by `go test ./fsm -run Spin -v`: see docs/model-check.md.\n")
	w(" *\n")
	w(" * The table's part (states, events, edges, the guard, the rules, each\n")
	w(" * state's operation) is generated from the fsm package's data. The\n")
	w(" * engine's part (Engine's steps and requests: engine.go, handler.go) and\n")
	w(" * the environment (the peer, the timers of every bound, the handler from\n")
	w(" * its callbacks or any goroutine, the server) are written in\n")
	w(" * fsm/promela.go. The claims are at the end.\n")
	w(" */\n\n")

	// The table's names.
	var states, events, ops []string
	for _, s := range States() {
		states = append(states, pState(s))
	}
	for _, e := range Events() {
		events = append(events, pEvent(e))
	}
	for o := Op(0); o < numOps; o++ {
		ops = append(ops, pOp(o))
	}
	w("/* The states, and noState for a missing edge. */\n")
	w("mtype = { %s, noState };\n", strings.Join(states, ", "))
	w("/* The events, and noEvent. */\n")
	w("mtype = { %s, noEvent };\n", strings.Join(events, ", "))
	w("/* What the driver does (State.Op); opNone: nothing handed out. */\n")
	w("mtype = { %s };\n\n", strings.Join(ops, ", "))
	w("/* The facts the rules read (Cond). */\n")
	for _, c := range Conds() {
		w("#define %-15s %d\n", pCond(c), c)
	}
	w("\n")

	b.WriteString(names.Replace(promelaState))

	// The table: edges and guard.
	w("/* lookup: nst is the table's destination of ev from st, noState if\n")
	w("   it has none or the guard refuses ev after the peer's FIN. */\n")
	w("inline lookup() {\n\tif\n")
	for _, t := range l.edges {
		w("\t:: st == %s && ev == %s -> nst = %s\n", pState(t.From), pEvent(t.Event), pState(t.To))
	}
	w("\t:: else -> nst = noState\n\tfi;\n")
	var guard []string
	for _, e := range l.guarded {
		guard = append(guard, "ev == "+pEvent(e))
	}
	if len(guard) > 0 {
		w("\tif\n\t:: peerfin && (%s) -> nst = noState\n\t:: else -> skip\n\tfi\n", strings.Join(guard, " || "))
	}
	w("}\n\n")

	// The table: each state's operation.
	w("/* next_op: Engine.Next. The table says what the driver does in each\n")
	w("   state; the engine turns a read into a wait when the handler paused\n")
	w("   reading (or, lingering, asked for a half-close) and after the peer's\n")
	w("   FIN, and starts the flush clock when it hands out a write. */\n")
	w("inline next_op() {\n\tif\n")
	for _, s := range States() {
		w("\t:: st == %s -> op = %s\n", pState(s), pOp(l.ops[s]))
	}
	w("\tfi;\n")
	b.WriteString(names.Replace(promelaNextOp))
	w("}\n\n")

	// The table: the rules.
	w("/* facts: Engine.facts. */\n")
	w("inline compute_facts() {\n\tfacts = 0;\n")
	for _, c := range Conds() {
		expr, ok := promelaFacts[c]
		if !ok {
			panic("fsm: promelaFacts does not say how the engine computes " + c.String())
		}
		w("\tif :: %s -> facts = facts | %s :: else -> skip fi;\n", expr, pCond(c))
	}
	w("}\n\n")
	w("/* due: Due. The first rule that applies fires ev; cause is the facts\n")
	w("   that made it apply. */\n")
	w("inline due() {\n\tfound = true;\n")
	depth := 0
	for _, r := range l.rules {
		indent := strings.Repeat("\t", depth+1)
		cond := fmt.Sprintf("%s && (facts & (%s)) != 0", pIn(r.From), pConds(r.When))
		if r.Unless != 0 {
			cond += fmt.Sprintf(" && (facts & (%s)) == 0", pConds(r.Unless))
		}
		w("%sif\n%s:: %s ->\n%s\tev = %s; cause = facts & (%s)\n%s:: else ->\n", indent, indent, cond, indent, pEvent(r.Fire), pConds(r.When), indent)
		depth++
	}
	w("%sfound = false\n", strings.Repeat("\t", depth+1))
	for depth > 0 {
		w("%sfi\n", strings.Repeat("\t", depth))
		depth--
	}
	w("}\n\n")

	b.WriteString(names.Replace(promelaEngine))

	w("\n/* The claims, checked one at a time: ./pan -a -f -N name. */\n")
	for _, c := range promelaClaims {
		w("\n%s", comment(c.name+": "+c.says+"."))
		w("ltl %s { %s }\n", c.name, names.Replace(c.formula))
	}
	return b.Bytes()
}

// comment wraps text into a Promela comment of lines under 76 columns.
func comment(text string) string {
	var b strings.Builder
	line := "/*"
	for _, word := range strings.Fields(text) {
		if len(line)+1+len(word) > 75 {
			b.WriteString(line + "\n")
			line = "  "
		}
		line += " " + word
	}
	b.WriteString(line + " */\n")
	return b.String()
}

// promelaState is the model's variables.
const promelaState = `#define closeNone 0
#define closeHalf 1
#define closeFull 2

/* The handler writes at most this many times; the state space stays small. */
#define MAX_WRITES 2

/* The machine. */
mtype st = $Accepted;
bool peerfin;         /* the peer's FIN was seen: the guard's bit */

/* The engine. */
mtype op = opNone;    /* e.op: what Next handed out; no step since */
bool abort_asked;
byte close_kind;      /* closeNone, closeHalf, closeFull */
bool owner_close;     /* Engine.Close: taken at the end of the next step */
bool out_q;           /* output queued and not yet written */
bool flushing;        /* the flush clock runs */
bool paused;          /* PauseRead */
bool held;            /* Conn.Hold */
bool timer;           /* the deadline of the current state has passed */
bool linger_full;     /* LingerBytes were read while HalfClosed */
bool slow;            /* a MinRate window ended short while Receiving */
byte notified;        /* OnClose calls */

/* The peer. */
bool peer_eof;        /* the peer sent its FIN */

/* The handler. */
byte writes;

/* Observers, for the claims. */
bool fin_out;         /* the driver performed CloseWrite: our FIN is out */
bool abort_cause;     /* an abort was asked for, or the write deadline passed */
byte entered_closed;  /* times Closed was entered */
byte closes;          /* times the driver closed or aborted the transport */
byte close_dones;     /* times close-done fired */
byte peer_fins;       /* times peer-fin fired */
bool crashed;         /* the engine recursed without end: the process died */

/* Temporaries of one engine step (always set before use). */
hidden mtype ev, nst;
hidden byte facts, cause;
hidden byte fired, found, reading;

inline inc(x) { if :: x < 2 -> x++ :: else -> skip fi }

#define may_close (st != $Closing && st != $Aborting && st != $Closed)
#define may_write (close_kind == closeNone && !abort_asked && (st == $Accepted || st == $Receiving || st == $Sending))

`

// promelaNextOp is the engine's part of Next, after the table's operation.
const promelaNextOp = `	if
	:: op == $opRead && ((paused && (st == $Receiving || close_kind == closeHalf)) || peerfin) -> op = $opWait
	:: else -> skip
	fi;
	if
	:: op == $opWrite -> flushing = true
	:: else -> skip
	fi;
	printf("Next: %e in %e\n", op, st)
`

// promelaEngine is the engine's steps and requests, and the environment.
const promelaEngine = `/* enter: Machine.Fire takes the edge ev to nst; Engine.fire keeps the
   clocks: a new state has a deadline of its own. */
inline enter() {
	printf("  %e: %e -> %e\n", ev, st, nst);
	if
	:: nst != st -> timer = false; flushing = false; slow = false
	:: else -> skip
	fi;
	if
	:: ev == $evPeerFin -> peerfin = true; inc(peer_fins)
	:: else -> skip
	fi;
	if
	:: ev == $evCloseDone -> inc(close_dones)
	:: else -> skip
	fi;
	if
	:: nst == $Closed && st != $Closed -> inc(entered_closed)
	:: else -> skip
	fi;
	st = nst
}

/* internal, fire: Engine.internal and Engine.fire. An illegal event is
   an engine bug: the output is dropped and the connection aborted, if it
   can still be; if the table has no abort edge either, internal and fire
   call each other until the stack overflows: the process dies. */
inline internal() {
	printf("  engine bug: %e is not an edge from %e\n", ev, st);
	if
	:: may_close ->
		out_q = false; flushing = false; abort_asked = false;
		ev = $evAbort; lookup();
		if
		:: nst != noState -> enter()
		:: else -> crashed = true; printf("  abort is not an edge either: the stack overflows\n")
		fi
	:: else -> skip
	fi
}

inline fire() {
	lookup();
	if
	:: nst != noState -> enter(); fired = true
	:: else -> fired = false; internal()
	fi
}

/* Requests: safe from any goroutine, they record what is asked. */

/* askAbort: Conn.Abort, Engine.Abort, and the driver's reset, I/O error
   or failed handshake. */
inline ask_abort() {
	if
	:: may_close ->
		if
		:: !abort_asked -> printf("  abort asked (Conn.Abort, Engine.Abort, or the driver's report)\n")
		:: else -> skip
		fi;
		abort_asked = true; abort_cause = true
	:: else -> skip
	fi
}

/* askClose: Conn.CloseWrite (closeHalf), Conn.Close (closeFull). */
inline ask_close(k) {
	if
	:: may_close && !abort_asked && close_kind < k ->
		close_kind = k;
		if
		:: k == closeHalf -> printf("  half-close asked (Conn.CloseWrite)\n")
		:: else -> printf("  close asked (Conn.Close, or the owner's close taken)\n")
		fi
	:: else -> skip
	fi
}

/* Engine.Close, the server's shutdown: taken at the end of the next step. */
inline engine_close() {
	if
	:: may_close && !abort_asked && close_kind != closeFull && !owner_close ->
		owner_close = true;
		printf("request: Engine.Close (the server shuts down)\n")
	:: else -> skip
	fi
}

/* because: what a state-triggered event means (Engine.because). */
inline because() {
	if
	:: ev == $evAbort -> abort_asked = false; out_q = false; flushing = false
	:: ev == $evHalfClose && (cause & IfCloseAsked) == 0 -> close_kind = closeFull
	:: else -> skip
	fi
}

/* How an operation ends: resDone (the handshake, if any, or the write or
   the half-close completed; the close returned), resInput (a chunk of
   input), resInputLingerBytes (a chunk that reaches LingerBytes, if
   lingering), resInputFIN (a chunk, then the peer's FIN), resFIN (the
   peer's FIN), resFailed (a reset, an I/O error, a failed handshake),
   resPartial (a part was written: the peer's window is full, or the
   deadline or a wake-up stopped it), resWoken (the deadline or a wake-up
   ended a read or a wait, or a request woke the handshake). */
mtype = { resNone, resDone, resInput, resInputLingerBytes, resInputFIN, resFIN, resFailed, resPartial, resWoken };

/* step: the driver reports how op ended, with Start, ReadDone, WriteDone,
   CloseWriteDone, CloseDone or HandleTimeout. */
inline step() {
	printf("%e ends: %e\n", op, res);
	reading = (op == $opRead && (st == $Receiving || st == $HalfClosed));
	ev = noEvent; fired = false;
	if
	:: op == $opStart && res == resDone && st == $Accepted && !abort_asked -> ev = $evStart
	:: op == $opStart && res == resFailed -> ask_abort()
	:: reading && (res == resInput || res == resInputLingerBytes || res == resInputFIN) -> ev = $evInput
	:: reading && res == resFailed -> ask_abort()
	:: op == $opWrite && st == $Sending && res == resDone -> out_q = false; flushing = false; ev = $evFlushed
	:: op == $opWrite && st == $Sending && res == resFailed -> ask_abort()
	:: op == $opCloseWrite && st == $HalfClosing && res == resDone -> ev = $evFinSent
	:: op == $opCloseWrite && st == $HalfClosing && res == resFailed -> ask_abort()
	:: (op == $opClose || op == $opAbort) && (st == $Closing || st == $Aborting) -> ev = $evCloseDone
	:: else -> skip
	fi;
	if
	:: op == $opCloseWrite -> fin_out = true
	:: op == $opClose || op == $opAbort -> inc(closes)
	:: else -> skip
	fi;
	if
	:: ev != noEvent -> fire()
	:: else -> skip
	fi;
	if
	:: reading && fired && res == resInputLingerBytes && st == $HalfClosed -> linger_full = true
	:: else -> skip
	fi;
	/* readEnded: the peer's FIN, if the machine can take it. */
	if
	:: reading && (res == resFIN || res == resInputFIN) ->
		ev = $evPeerFin; lookup();
		if
		:: nst != noState -> fire()
		:: else -> skip
		fi
	:: else -> skip
	fi;
	/* CloseDone: OnClose, once. */
	if
	:: (op == $opClose || op == $opAbort) && st == $Closed && notified == 0 -> notified = 1; printf("  OnClose\n")
	:: else -> skip
	fi;
	op = opNone
}

/* The processes: the requests, the timers, then the driver. spin tries
   the last process's moves first, so a counterexample shows the driver
   going its way and the environment stepping in only where it must. */

/* Requests, at any moment: the handler's, from its callbacks or from any
   other goroutine (Conn.Write, CloseWrite, Close, Abort, Hold, PauseRead,
   ResumeRead), and the server's (Shutdown: Engine.Close; its deadline:
   Engine.Abort, which records an abort as Conn.Abort does). Weak fairness
   does not force a request: there is always one that changes nothing. */
active proctype Requests() {
end:
	do
	:: d_step { writes < MAX_WRITES && may_write; out_q = true; writes++; printf("request: Conn.Write\n") }
	:: d_step { ask_close(closeHalf) }
	:: d_step { ask_close(closeFull) }
	:: d_step { engine_close() }
	:: d_step { ask_abort() }
	:: d_step {
		if
		:: !held -> printf("request: Conn.Hold\n")
		:: else -> skip
		fi;
		held = true
	}
	:: d_step {
		if
		:: !paused -> printf("request: Conn.PauseRead\n")
		:: else -> skip
		fi;
		paused = true; slow = false
	}
	:: d_step {
		if
		:: paused -> printf("request: Conn.ResumeRead\n")
		:: else -> skip
		fi;
		paused = false
	}
	od
}

/* The timers of every bound: the deadline of the current state may pass
   at any moment (IdleTimeout or MaxLifetime while Receiving, WriteTimeout
   once the flush began, LingerTimeout or LingerTime while HalfClosed).
   Weak fairness makes a deadline that stays armed pass. */
active proctype Timers() {
end:
	do
	:: d_step {
		!timer && (st == $Receiving || st == $HalfClosed || (st == $Sending && flushing));
		timer = true;
		printf("timer: the deadline of %e passed\n", st);
		if
		:: st == $Sending -> abort_cause = true
		:: else -> skip
		fi
	}
	od
}

/* MinRate: a window may end short while Receiving with reading on,
   nothing queued and no FIN from the peer; output, a pause or a new state
   end the window (slow is cleared). A process of its own, so that weak
   fairness still makes the deadlines above pass. */
active proctype Rates() {
end:
	do
	:: d_step {
		!slow && st == $Receiving && !paused && !peerfin && !out_q;
		slow = true;
		printf("timer: a MinRate window ended short\n")
	}
	od
}

/* The driver: Next; the operation, whose end the peer, the transport or a
   request decides; the step that reports it; and the settle loop
   (Engine.settle), which takes the owner's close, then fires the rules
   until none applies. The handler's callbacks and the other goroutines'
   requests interleave between Next and the step, and between the step and
   each rule the settle loop fires. */
active proctype Driver() {
	mtype res = resNone;
	byte settling; /* 1: the settle loop starts; 2: it runs; 0: done */
	do
	:: d_step { next_op() };
		if
		:: op == $opDone -> break
		:: else -> skip
		fi;
		atomic {
			if
			:: op == $opStart ->
				if
				:: res = resDone
				:: res = resFailed
				:: owner_close || (close_kind != closeNone && !out_q) || abort_asked -> res = resWoken /* the real driver starts a connection its wake-up left in Accepted */
				fi
			:: op == $opRead ->
				if
				:: !peer_eof -> res = resInput
				:: !peer_eof -> res = resInputLingerBytes
				:: !peer_eof -> res = resInputFIN; peer_eof = true
				:: res = resFIN; peer_eof = true
				:: res = resFailed
				:: res = resWoken
				fi
			:: op == $opWait -> res = resWoken
			:: op == $opWrite ->
				if
				:: res = resDone
				:: out_q -> res = resPartial
				:: out_q -> res = resFailed
				fi
			:: op == $opCloseWrite ->
				if
				:: res = resDone
				:: res = resFailed
				fi
			:: op == $opClose || op == $opAbort -> res = resDone
			fi;
			d_step { step(); res = resNone; settling = 1 }
		};
		if
		:: crashed -> break
		:: else -> skip
		fi;
		do
		:: d_step {
			settling > 0;
			if
			:: settling == 1 && owner_close -> owner_close = false; ask_close(closeFull)
			:: else -> skip
			fi;
			compute_facts(); due();
			if
			:: found -> printf("  rule: %e (cause %d)\n", ev, cause); because(); fire(); settling = 2
			:: else -> settling = 0
			fi;
			if
			:: crashed -> settling = 0
			:: else -> skip
			fi
		}
		:: settling == 0 -> break
		od;
		if
		:: crashed -> break
		:: else -> skip
		fi
	od
}
`
