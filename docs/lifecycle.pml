/*
 * The lifecycle of a sockfsm connection as a Promela model, for spin.
 * Generated from fsm/table.go by `go test ./fsm -update`. Do not edit.
 * Checked by `go test ./fsm -run Spin -v`: see docs/model-check.md.
 *
 * The table's part (states, events, edges, the guard, the rules, each
 * state's operation) is generated from the fsm package's data. The
 * engine's part (Engine's steps and requests: engine.go, handler.go) and
 * the environment (the peer, the timers of every bound, the handler from
 * its callbacks or any goroutine, the server) are written in
 * fsm/promela.go. The claims are at the end.
 */

/* The states, and noState for a missing edge. */
mtype = { Accepted, Receiving, Sending, HalfClosing, HalfClosed, Closing, Aborting, Closed, noState };
/* The events, and noEvent. */
mtype = { evStart, evInput, evOutput, evFlushed, evPeerFin, evHalfClose, evFinSent, evClose, evAbort, evCloseDone, noEvent };
/* What the driver does (State.Op); opNone: nothing handed out. */
mtype = { opNone, opStart, opRead, opWait, opWrite, opCloseWrite, opClose, opAbort, opDone };

/* The facts the rules read (Cond). */
#define IfAbortAsked    1
#define IfCloseAsked    2
#define IfOutputQueued  4
#define IfPeerFin       8
#define IfTimer         16
#define IfLingerBytes   32
#define IfHeld          64
#define IfMinRate       128

#define closeNone 0
#define closeHalf 1
#define closeFull 2

/* The handler writes at most this many times; the state space stays small. */
#define MAX_WRITES 2

/* The machine. */
mtype st = Accepted;
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

#define may_close (st != Closing && st != Aborting && st != Closed)
#define may_write (close_kind == closeNone && !abort_asked && (st == Accepted || st == Receiving || st == Sending))

/* lookup: nst is the table's destination of ev from st, noState if
   it has none or the guard refuses ev after the peer's FIN. */
inline lookup() {
	if
	:: st == Accepted && ev == evStart -> nst = Receiving
	:: st == Accepted && ev == evClose -> nst = Closing
	:: st == Accepted && ev == evAbort -> nst = Aborting
	:: st == Receiving && ev == evInput -> nst = Receiving
	:: st == Receiving && ev == evOutput -> nst = Sending
	:: st == Receiving && ev == evPeerFin -> nst = Receiving
	:: st == Receiving && ev == evHalfClose -> nst = HalfClosing
	:: st == Receiving && ev == evAbort -> nst = Aborting
	:: st == Sending && ev == evFlushed -> nst = Receiving
	:: st == Sending && ev == evAbort -> nst = Aborting
	:: st == HalfClosing && ev == evFinSent -> nst = HalfClosed
	:: st == HalfClosing && ev == evAbort -> nst = Aborting
	:: st == HalfClosed && ev == evInput -> nst = HalfClosed
	:: st == HalfClosed && ev == evPeerFin -> nst = HalfClosed
	:: st == HalfClosed && ev == evClose -> nst = Closing
	:: st == HalfClosed && ev == evAbort -> nst = Aborting
	:: st == Closing && ev == evCloseDone -> nst = Closed
	:: st == Aborting && ev == evCloseDone -> nst = Closed
	:: else -> nst = noState
	fi;
	if
	:: peerfin && (ev == evInput || ev == evPeerFin) -> nst = noState
	:: else -> skip
	fi
}

/* next_op: Engine.Next. The table says what the driver does in each
   state; the engine turns a read into a wait when the handler paused
   reading (or, lingering, asked for a half-close) and after the peer's
   FIN, and starts the flush clock when it hands out a write. */
inline next_op() {
	if
	:: st == Accepted -> op = opStart
	:: st == Receiving -> op = opRead
	:: st == Sending -> op = opWrite
	:: st == HalfClosing -> op = opCloseWrite
	:: st == HalfClosed -> op = opRead
	:: st == Closing -> op = opClose
	:: st == Aborting -> op = opAbort
	:: st == Closed -> op = opDone
	fi;
	if
	:: op == opRead && ((paused && (st == Receiving || close_kind == closeHalf)) || peerfin) -> op = opWait
	:: else -> skip
	fi;
	if
	:: op == opWrite -> flushing = true
	:: else -> skip
	fi;
	printf("Next: %e in %e\n", op, st)
}

/* facts: Engine.facts. */
inline compute_facts() {
	facts = 0;
	if :: abort_asked -> facts = facts | IfAbortAsked :: else -> skip fi;
	if :: close_kind != closeNone -> facts = facts | IfCloseAsked :: else -> skip fi;
	if :: out_q -> facts = facts | IfOutputQueued :: else -> skip fi;
	if :: peerfin -> facts = facts | IfPeerFin :: else -> skip fi;
	if :: timer -> facts = facts | IfTimer :: else -> skip fi;
	if :: linger_full -> facts = facts | IfLingerBytes :: else -> skip fi;
	if :: held -> facts = facts | IfHeld :: else -> skip fi;
	if :: slow && !paused && !peerfin && !out_q -> facts = facts | IfMinRate :: else -> skip fi;
}

/* due: Due. The first rule that applies fires ev; cause is the facts
   that made it apply. */
inline due() {
	found = true;
	if
	:: (st == Accepted || st == Receiving || st == Sending || st == HalfClosing || st == HalfClosed) && (facts & (IfAbortAsked)) != 0 ->
		ev = evAbort; cause = facts & (IfAbortAsked)
	:: else ->
		if
		:: (st == Accepted) && (facts & (IfCloseAsked)) != 0 && (facts & (IfOutputQueued)) == 0 ->
			ev = evClose; cause = facts & (IfCloseAsked)
		:: else ->
			if
			:: (st == Receiving) && (facts & (IfOutputQueued)) != 0 ->
				ev = evOutput; cause = facts & (IfOutputQueued)
			:: else ->
				if
				:: (st == Receiving) && (facts & (IfCloseAsked | IfTimer | IfMinRate)) != 0 ->
					ev = evHalfClose; cause = facts & (IfCloseAsked | IfTimer | IfMinRate)
				:: else ->
					if
					:: (st == Receiving) && (facts & (IfPeerFin)) != 0 && (facts & (IfHeld)) == 0 ->
						ev = evHalfClose; cause = facts & (IfPeerFin)
					:: else ->
						if
						:: (st == Sending) && (facts & (IfTimer)) != 0 ->
							ev = evAbort; cause = facts & (IfTimer)
						:: else ->
							if
							:: (st == HalfClosed) && (facts & (IfPeerFin | IfTimer | IfLingerBytes)) != 0 ->
								ev = evClose; cause = facts & (IfPeerFin | IfTimer | IfLingerBytes)
							:: else ->
								found = false
							fi
						fi
					fi
				fi
			fi
		fi
	fi
}

/* enter: Machine.Fire takes the edge ev to nst; Engine.fire keeps the
   clocks: a new state has a deadline of its own. */
inline enter() {
	printf("  %e: %e -> %e\n", ev, st, nst);
	if
	:: nst != st -> timer = false; flushing = false; slow = false
	:: else -> skip
	fi;
	if
	:: ev == evPeerFin -> peerfin = true; inc(peer_fins)
	:: else -> skip
	fi;
	if
	:: ev == evCloseDone -> inc(close_dones)
	:: else -> skip
	fi;
	if
	:: nst == Closed && st != Closed -> inc(entered_closed)
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
		ev = evAbort; lookup();
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
	:: ev == evAbort -> abort_asked = false; out_q = false; flushing = false
	:: ev == evHalfClose && (cause & IfCloseAsked) == 0 -> close_kind = closeFull
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
	reading = (op == opRead && (st == Receiving || st == HalfClosed));
	ev = noEvent; fired = false;
	if
	:: op == opStart && res == resDone && st == Accepted && !abort_asked -> ev = evStart
	:: op == opStart && res == resFailed -> ask_abort()
	:: reading && (res == resInput || res == resInputLingerBytes || res == resInputFIN) -> ev = evInput
	:: reading && res == resFailed -> ask_abort()
	:: op == opWrite && st == Sending && res == resDone -> out_q = false; flushing = false; ev = evFlushed
	:: op == opWrite && st == Sending && res == resFailed -> ask_abort()
	:: op == opCloseWrite && st == HalfClosing && res == resDone -> ev = evFinSent
	:: op == opCloseWrite && st == HalfClosing && res == resFailed -> ask_abort()
	:: (op == opClose || op == opAbort) && (st == Closing || st == Aborting) -> ev = evCloseDone
	:: else -> skip
	fi;
	if
	:: op == opCloseWrite -> fin_out = true
	:: op == opClose || op == opAbort -> inc(closes)
	:: else -> skip
	fi;
	if
	:: ev != noEvent -> fire()
	:: else -> skip
	fi;
	if
	:: reading && fired && res == resInputLingerBytes && st == HalfClosed -> linger_full = true
	:: else -> skip
	fi;
	/* readEnded: the peer's FIN, if the machine can take it. */
	if
	:: reading && (res == resFIN || res == resInputFIN) ->
		ev = evPeerFin; lookup();
		if
		:: nst != noState -> fire()
		:: else -> skip
		fi
	:: else -> skip
	fi;
	/* CloseDone: OnClose, once. */
	if
	:: (op == opClose || op == opAbort) && st == Closed && notified == 0 -> notified = 1; printf("  OnClose\n")
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
		!timer && (st == Receiving || st == HalfClosed || (st == Sending && flushing));
		timer = true;
		printf("timer: the deadline of %e passed\n", st);
		if
		:: st == Sending -> abort_cause = true
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
		!slow && st == Receiving && !paused && !peerfin && !out_q;
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
		:: op == opDone -> break
		:: else -> skip
		fi;
		atomic {
			if
			:: op == opStart ->
				if
				:: res = resDone
				:: res = resFailed
				:: owner_close || (close_kind != closeNone && !out_q) || abort_asked -> res = resWoken /* the real driver starts a connection its wake-up left in Accepted */
				fi
			:: op == opRead ->
				if
				:: !peer_eof -> res = resInput
				:: !peer_eof -> res = resInputLingerBytes
				:: !peer_eof -> res = resInputFIN; peer_eof = true
				:: res = resFIN; peer_eof = true
				:: res = resFailed
				:: res = resWoken
				fi
			:: op == opWait -> res = resWoken
			:: op == opWrite ->
				if
				:: res = resDone
				:: out_q -> res = resPartial
				:: out_q -> res = resFailed
				fi
			:: op == opCloseWrite ->
				if
				:: res = resDone
				:: res = resFailed
				fi
			:: op == opClose || op == opAbort -> res = resDone
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

/* The claims, checked one at a time: ./pan -a -f -N name. */

/* fin_last: our FIN is the last thing on the write side: no write is
   handed out after it (in a state past our half-close, or once CloseWrite
   was performed), and it goes only when no output is queued. */
ltl fin_last { [] ((op == opWrite -> (!fin_out && st != HalfClosing && st != HalfClosed && st != Closing && st != Aborting && st != Closed)) && (op == opCloseWrite -> !out_q)) }

/* closes: every run ends in Closed (weak fairness: a deadline that stays
   armed passes, the driver keeps going). */
ltl closes { <>[] (st == Closed) }

/* closed_once: Closed is entered once, and the transport closed (OpClose
   or OpAbort performed) once, before it. */
ltl closed_once { [] (entered_closed <= 1 && closes <= 1 && (st == Closed -> closes == 1)) }

/* no_rst_graceful: no RST on a graceful path: OpAbort is handed out only
   if an abort was asked for (the handler, the server, the driver's reset,
   I/O error or failed handshake) or the write deadline passed. */
ltl no_rst_graceful { [] (op == opAbort -> abort_cause) }

/* on_close_once: OnClose is called exactly once, after close-done. */
ltl on_close_once { <> (notified == 1) && [] (notified <= 1 && (notified == 1 -> (st == Closed && close_dones >= 1))) }

/* linger_bytes: once LingerBytes were read after our FIN, no read is
   handed out. */
ltl linger_bytes { [] !(op == opRead && linger_full) }

/* peer_fin_once: the peer's FIN is taken once (the handler hears
   OnPeerClose once). */
ltl peer_fin_once { [] (peer_fins <= 1) }
