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
		"The engine has the connection but has not started reading.",
		"None: the engine starts at once.",
	},
	Receiving: {
		"Waiting for input; nothing pending to send. Input goes to the handler, which may queue output.",
		"`IdleTimeout` (no input for that long: graceful half-close); `MaxLifetime` (graceful close).",
	},
	Sending: {
		"Flushing the output the handler queued. No input is read until the flush completes, so a peer that floods without reading is held back by TCP flow control.",
		"`WriteTimeout` bounds the whole flush (the peer stopped reading: abort with RST).",
	},
	HalfClosed: {
		"We sent our FIN and write nothing more. The engine lingers: it reads (and discards, or hands to a handler that asked for a half-close) until the peer's FIN, then closes, so the kernel never answers unread input with an RST that would destroy the response.",
		"`LingerTimeout` per read, `LingerTime` in total, `LingerBytes` read in total; whichever comes first closes the connection. If the peer's FIN was already seen, the engine closes at once.",
	},
	Closed: {
		"Terminal. The transport has been closed exactly once, gracefully or by abort, and the handler has been told why.",
		"None.",
	},
}

// eventDocs says what each event means.
var eventDocs = [numEvents]string{
	Start:     "The engine starts reading.",
	Input:     "A chunk of input arrived from the peer.",
	Output:    "The handler queued output.",
	Flushed:   "Every queued byte reached the transport.",
	PeerFIN:   "The peer's FIN: end of file on read. The peer will send nothing more.",
	HalfClose: "Our FIN: the transport's CloseWrite (`shutdown(SD_SEND)`). Taken on the handler's CloseWrite or Close, the idle timeout, `MaxLifetime`, server shutdown, or after the peer's FIN once the output is flushed.",
	Close:     "The graceful close: the peer's FIN was seen, or a linger bound was reached; or the server shut down before the connection started (during its TLS handshake), when nothing was read or written.",
	Abort:     "Abortive close, RST (`SO_LINGER` 0): a read or write error, the peer's reset, the write timeout, the handler's Abort or panic, or the server's shutdown deadline.",
}

// promises are the engine's guarantees and the tests that check them.
var promises = []struct{ promise, tests string }{
	{
		"**No send after shutdown.** After our half-close nothing reaches the transport's write side; a handler's Write returns `ErrShutdown`.",
		"`TestPropertyNoSendAfterShutdown` (properties_test.go), `TestWriteAfterCloseWrite`",
	},
	{
		"**Every connection is closed, exactly once, within its bounds.** Whatever the peer does, the transport is closed once, the handler hears `OnClose` once and last, and the connection reaches Closed by the bound computed from the configuration.",
		"`TestPropertyEveryConnectionClosed` (properties_test.go), the real-socket tests in server_test.go",
	},
	{
		"**No byte lost, reordered or cut off by an RST of ours.** A peer that reads receives exactly what the handler wrote before the half-close, in order, then FIN; no RST of ours is sent while the peer's input is unread, except on the abort paths listed under `abort`.",
		"`TestPropertyEchoIsExact` (properties_test.go), `TestTutorialFlow`, `TestLingerNoReset` (server_test.go)",
	},
	{
		"**Only table edges.** Every transition the engine takes is an edge of this table, and the looplab/fsm reference machine accepts it.",
		"`TestPropertyOnlyTableEdges` (properties_test.go), `TestEveryStateEventPair` (fsm)",
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

// Mermaid renders the table as a fenced Mermaid stateDiagram-v2 block, with
// start and end markers.
func Mermaid() string {
	var b strings.Builder
	b.WriteString("```mermaid\nstateDiagram-v2\n")
	fmt.Fprintf(&b, "    [*] --> %s\n", goName(Accepted.String()))
	for _, t := range Transitions() {
		fmt.Fprintf(&b, "    %s --> %s: %s\n", goName(t.From.String()), goName(t.To.String()), t.Event)
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
	w("Every sockfsm connection follows this state machine. The table is declared once, in\n")
	w("`fsm/table.go`, with github.com/looplab/fsm; this page, the engine's lookup array and the\n")
	w("tests' list of legal edges are all derived from it. An event that is not an edge here is\n")
	w("refused with `fsm.ErrInvalidTransition` and changes nothing.\n\n")

	b.WriteString(Mermaid())
	w("\n")

	w("## States\n\n")
	w("| State | Meaning | May go to | Timeouts |\n|---|---|---|---|\n")
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
		w("| %s | %s | %s | %s |\n", goName(s.String()), stateDocs[s].meaning, dst, stateDocs[s].timeouts)
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

	w("\n## The peer's FIN\n\n")
	w("Whether the peer has sent its FIN is metadata of the machine (`Machine.PeerFIN`), set by the\n")
	w("`peer-fin` event. It guards the table: once it is set, these events are refused in every state:\n")
	var g []string
	for _, e := range guardedByPeerFIN {
		g = append(g, "`"+e.String()+"`")
	}
	w("%s. The engine uses it to end the connection: after the peer's FIN it lets the handler\n", strings.Join(g, ", "))
	w("answer, flushes, half-closes and closes at once, without lingering, so no socket is left in CLOSE_WAIT.\n")

	w("\n## Promises\n\n")
	w("| Promise | Checked by |\n|---|---|\n")
	for _, p := range promises {
		w("| %s | %s |\n", p.promise, p.tests)
	}
	return b.Bytes()
}
