package fsm

import (
	"bytes"
	"fmt"
	"strings"
)

// stateDocs says, per state, what it means and which timeouts bound it. The
// edges are not written here: Markdown derives them from the table.
var stateDocs = [numStates]struct{ meaning, timeouts string }{
	Accepted: {
		"The engine has the connection but has not started reading (a TLS handshake may be under way).",
		"None of the engine's: the driver bounds a TLS handshake by `IdleTimeout`.",
	},
	Receiving: {
		"Waiting for input; nothing queued to send. Input goes to the handler, which may queue output, from its callbacks or from any goroutine. The handler may pause reading.",
		"`IdleTimeout` (nothing read and nothing written for that long; stopped while reading is paused): graceful half-close; `MinRate` (input over a window of `MinRateWindow` that began with input, some but less than `MinRate`×`MinRateWindow` bytes; the window restarts on output, a pause or the peer's FIN): graceful half-close; `MaxLifetime` (graceful close).",
	},
	Sending: {
		"Flushing the output the handler queued. No input is read until the flush completes, so a peer that floods without reading is held back by TCP flow control.",
		"`WriteTimeout` bounds the whole flush (the peer stopped reading: abort with RST).",
	},
	HalfClosing: {
		"The engine decided to half-close and is handing our FIN to the transport. Nothing more is written.",
		"None: the transport's CloseWrite does not block for long.",
	},
	HalfClosed: {
		"Our FIN is out and we write nothing more. The engine lingers: it reads (and discards, or hands to a handler that asked for a half-close) until the peer's FIN, then closes, so the kernel never answers unread input with an RST that would destroy the response.",
		"`LingerTimeout` per read, `LingerTime` in total, `LingerBytes` read in total; whichever comes first closes the connection. If the peer's FIN was already seen, the engine closes at once.",
	},
	Closing: {
		"The engine decided to close gracefully; the transport's Close is under way.",
		"None.",
	},
	Aborting: {
		"The engine decided to abort; the transport's Abort (RST, `SO_LINGER` 0) is under way.",
		"None.",
	},
	Closed: {
		"Terminal. The transport has been closed exactly once, gracefully or by abort, and the handler has been told why.",
		"None.",
	},
}

// eventDocs says what each event means.
var eventDocs = [numEvents]string{
	Start:     "The engine starts (the driver calls Start): OnOpen runs.",
	Input:     "A chunk of input arrived from the peer (ReadDone).",
	Output:    "The handler queued output (state-triggered: output is queued).",
	Flushed:   "Every queued byte reached the transport (WriteDone).",
	PeerFIN:   "The peer's FIN: end of file on read (ReadDone). The peer will send nothing more.",
	HalfClose: "The decision to half-close (state-triggered): a close was asked for with nothing left to flush, the peer's FIN was read, a receive timer passed, or the peer's input stayed below MinRate over a window.",
	FINSent:   "Our FIN was handed to the transport: its CloseWrite (`shutdown(SD_SEND)`) returned (CloseWriteDone).",
	Close:     "The decision to close gracefully (state-triggered): the linger ended, or a connection that never started was asked to close.",
	Abort:     "The decision to abort (state-triggered): an abort was asked for (a reset or I/O error the driver reported, Conn.Abort, Engine.Abort, a panic, the server's deadline), or the flush passed `WriteTimeout`.",
	CloseDone: "The transport's Close or Abort returned (CloseDone). OnClose runs.",
}

// condDocs says what each fact means.
var condDocs = [numConds]string{
	"An abort was asked for: by Conn.Abort, Engine.Abort, the server, a handler panic, or a driver that reported a reset, an I/O error or a failed handshake.",
	"A graceful close or half-close was asked for: Conn.Close or CloseWrite, Engine.Close (the server's shutdown), or MaxLifetime.",
	"Output is queued and not yet handed to the transport.",
	"The peer's FIN was read (the machine's own bit, which also guards the table).",
	"The deadline of the current state has passed (see Timeouts above).",
	"`LingerBytes` were read while lingering.",
	"The handler holds the connection open after the peer's FIN (`Conn.Hold`): the net.Conn face, whose application closes it as it would a net.Conn.",
	"The peer trickles: a window of `MinRateWindow`, started by input while Receiving with reading on, nothing to flush and no FIN from the peer, ended with some input but less than `MinRate`×`MinRateWindow` bytes. A window with no input is `IdleTimeout`'s business.",
}

// promises are the engine's guarantees and the tests that check them.
var promises = []struct{ promise, tests string }{
	{
		"**No send after shutdown.** After our half-close nothing reaches the transport's write side; a handler's Write returns `ErrShutdown`.",
		"`TestPropertyNoSendAfterShutdown` (properties_test.go), `TestDrivers/*/WriteAfterCloseWrite` (internal/drivertest)",
	},
	{
		"**Every connection is closed, exactly once, within its bounds.** Whatever the peer does, the transport is closed once, the handler hears `OnClose` once and last, and the connection reaches Closed by the bound computed from the configuration.",
		"`TestPropertyEveryConnectionClosed` (properties_test.go), the real-socket suite in internal/drivertest (`TestDrivers`)",
	},
	{
		"**No byte lost, reordered or cut off by an RST of ours.** A peer that reads receives exactly what the handler wrote before the half-close, in order, then FIN; no RST of ours is sent while the peer's input is unread, except on the abort paths listed under `abort`.",
		"`TestPropertyEchoIsExact` (properties_test.go), `TestDrivers/*/TutorialFlow`, `TestDrivers/*/LingerNoReset` (internal/drivertest)",
	},
	{
		"**Only table edges.** Every transition the engine takes is an edge of this table, and the looplab/fsm reference machine accepts it.",
		"`TestPropertyOnlyTableEdges` (properties_test.go), `TestEveryStateEventPair` (fsm)",
	},
	{
		"**Exhaustively, on the model.** Every interleaving of the peer, the timers, the handler and the server against the table and rules: no write after our FIN, every run reaches Closed (weak fairness), Closed and OnClose once, no RST on a graceful path (docs/lifecycle.pml, generated from this table; docs/model-check.md).",
		"`TestSpin` (fsm/promela_test.go, with spin)",
	},
}

// goName turns a table name such as "half-closed" into "HalfClosed".
func goName(name string) string {
	var b strings.Builder
	for _, part := range strings.Split(name, "-") {
		if part != "" {
			b.WriteString(strings.ToUpper(part[:1]) + part[1:])
		}
	}
	return b.String()
}

// label is an edge's label in the diagram: the event, then what triggers
// it: the state-triggered rules' facts in brackets, and the guard.
func label(t Transition) string {
	l := t.Event.String()
	var when []string
	for _, r := range rules {
		if r.Fire == t.Event && slicesContains(r.From, t.From) {
			w := strings.ReplaceAll(r.When.String(), "|", " or ")
			if r.Unless != 0 {
				w += " unless " + strings.ReplaceAll(r.Unless.String(), "|", " or ")
			}
			when = append(when, w)
		}
	}
	if len(when) > 0 {
		l += " [" + strings.Join(when, "; ") + "]"
	}
	if refusedAfterPeerFIN(t.Event) {
		l += " (guarded: no peer-fin yet)"
	}
	return l
}

func slicesContains(ss []State, s State) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// Mermaid renders the table as a fenced Mermaid stateDiagram-v2 block, with
// start and end markers. A state-triggered edge shows the facts that fire it
// in brackets; a guarded edge says so.
func Mermaid() string {
	var b strings.Builder
	b.WriteString("```mermaid\nstateDiagram-v2\n")
	fmt.Fprintf(&b, "    [*] --> %s\n", goName(Accepted.String()))
	for _, t := range Transitions() {
		fmt.Fprintf(&b, "    %s --> %s: %s\n", goName(t.From.String()), goName(t.To.String()), label(t))
	}
	for _, s := range States() {
		if s.Terminal() {
			fmt.Fprintf(&b, "    %s --> [*]\n", goName(s.String()))
		}
	}
	b.WriteString("```\n")
	return b.String()
}

// Markdown renders docs/state-diagram.md from the table.
func Markdown() []byte {
	var b bytes.Buffer
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	edges := Transitions()

	w("# Connection lifecycle\n\n")
	w("<!-- Generated from fsm/table.go by `go test ./fsm -update`. Do not edit. -->\n\n")
	w("Every sockfsm connection follows this state machine. The lifecycle is declared once, as data, in\n")
	w("`fsm/table.go`: the edges (with github.com/looplab/fsm), the guard, and the state-triggered rules.\n")
	w("This page, the engine's lookup arrays and the tests' lists of legal edges and rules are all\n")
	w("derived from it. An event that is not an edge here is refused with `fsm.ErrInvalidTransition`\n")
	w("and changes nothing. Each state is entered when it is true of the socket: HalfClosed once our\n")
	w("FIN was handed to the transport, Closed once the transport was closed.\n\n")
	w("An edge labelled `event [facts]` is state-triggered: the engine fires it when one of the facts\n")
	w("holds (see the rules below). The others are fired by what the driver reports: `start`, `input`,\n")
	w("`flushed`, `peer-fin`, `fin-sent`, `close-done`.\n\n")

	b.WriteString(Mermaid())
	w("\n")

	w("## States\n\n")
	w("| State | Meaning | The driver | May go to | Timeouts |\n|---|---|---|---|---|\n")
	for _, s := range States() {
		var to []string
		for _, t := range edges {
			if t.From == s {
				to = append(to, fmt.Sprintf("%s (`%s`)", goName(t.To.String()), t.Event))
			}
		}
		dst := strings.Join(to, ", ")
		if s.Terminal() {
			dst = "nothing: terminal"
		}
		op := "`" + s.Op().String() + "`"
		if s.Op() == OpRead {
			op += " (`wait` while the handler has paused reading)"
		}
		w("| %s | %s | %s | %s | %s |\n", goName(s.String()), stateDocs[s].meaning, op, dst, stateDocs[s].timeouts)
	}

	w("\n## Events\n\n")
	w("| Event | Meaning | Edges |\n|---|---|---|\n")
	for _, e := range Events() {
		var on []string
		for _, t := range edges {
			if t.Event == e {
				on = append(on, fmt.Sprintf("%s → %s", goName(t.From.String()), goName(t.To.String())))
			}
		}
		w("| `%s` | %s | %s |\n", e, eventDocs[e], strings.Join(on, "; "))
	}

	w("\n## State-triggered rules\n\n")
	w("After every event it fires and every request it takes (from a callback or from another goroutine),\n")
	w("the engine computes these facts and fires the first rule that applies, until none does.\n\n")
	w("| Fact | Meaning |\n|---|---|\n")
	for i, c := range Conds() {
		w("| `%s` | %s |\n", c, condDocs[i])
	}
	w("\n| # | In | When any of | Unless | Fires | Why |\n|---|---|---|---|---|---|\n")
	for i, r := range rules {
		var from []string
		for _, s := range r.From {
			from = append(from, goName(s.String()))
		}
		unless := ""
		if r.Unless != 0 {
			unless = "`" + strings.ReplaceAll(r.Unless.String(), "|", "` or `") + "`"
		}
		w("| %d | %s | `%s` | %s | `%s` | %s |\n", i+1, strings.Join(from, ", "), strings.ReplaceAll(r.When.String(), "|", "` or `"), unless, r.Fire, r.Why)
	}

	w("\n## The peer's FIN\n\n")
	w("Whether the peer has sent its FIN is metadata of the machine (`Machine.PeerFIN`), set by the\n")
	w("`peer-fin` event. It guards the table: once it is set, these events are refused in every state:\n")
	var g []string
	for _, e := range guardedByPeerFIN {
		g = append(g, "`"+e.String()+"`")
	}
	w("%s. It is also the fact `peer-fin` of the rules: after the peer's FIN the engine lets the handler\n", strings.Join(g, ", "))
	w("answer, flushes, half-closes and closes at once, without lingering, so no socket is left in CLOSE_WAIT.\n")

	w("\n## Promises\n\n")
	w("| Promise | Checked by |\n|---|---|\n")
	for _, p := range promises {
		w("| %s | %s |\n", p.promise, p.tests)
	}
	return b.Bytes()
}
