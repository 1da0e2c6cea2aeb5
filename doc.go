// Package sockfsm runs each TCP connection as an explicit state machine, so
// that a server that embeds it gets the connection's lifecycle right: it
// answers the peer's FIN instead of leaving the socket in CLOSE_WAIT, it
// half-closes and lingers instead of closing with unread input (which makes
// the kernel send RST and destroy the response in flight), every state has
// a timeout, and a shutdown returns only when every connection is closed.
//
// # The lifecycle
//
// A connection goes Accepted → Receiving ⇄ Sending → HalfClosing →
// HalfClosed → Closing → Closed, or to Aborting (RST) and then Closed. It
// reads only in Receiving and HalfClosed, so a peer that floods without
// reading is held back by TCP flow control. After our FIN (HalfClosed) it
// lingers, reading until the peer's FIN within LingerTimeout, LingerTime
// and LingerBytes, and only then closes. The lifecycle is data, declared
// once in package [github.com/sockfsm/sockfsm/fsm]: the edges, the guard
// (the peer's FIN) and the state-triggered rules; the engine computes the
// facts the rules read and fires what they say. The [state diagram] is
// generated from it and describes every state, event and timeout. The
// reason each connection ended, and whether it ended with FIN or RST, is
// reported once in a [CloseInfo].
//
// # Serving
//
// [Server] accepts connections and runs each on a goroutine of its own with
// a [Handler] from Server.NewHandler; [Server.Shutdown] stops accepting,
// half-closes idle connections, lets busy ones flush, and aborts whatever is
// left at its context's deadline. [ServeConn] runs one connection over any
// [Transport]: package [github.com/sockfsm/sockfsm/transport] has TCP, Unix
// socket and TLS adapters and an in-memory Pipe with real half-close
// semantics. [Config] holds the timeouts and limits: zero means the
// default, negative means off. Config.MaxConnsPerIP and Config.Prelude
// decide whether a connection is served at all, before it exists for the
// engine; package [github.com/sockfsm/sockfsm/proxy] reads the PROXY
// protocol header as a prelude, and Config.OnRefuse hears of each
// connection refused, with its reason. For code written against net.Listener and
// net.Conn, [Listener] gives each accepted connection (a [NetConn]) the same
// lifecycle.
//
// # Handlers and Conn
//
// The engine calls a Handler's OnData with each chunk of input, one call at
// a time, on the connection's goroutine; the optional [OpenHandler],
// [PeerCloseHandler], [DrainHandler], [FlushHandler] and [CloseHandler] hear
// of the other moments, OnClose exactly once and last. A callback must not
// block for long.
//
// A [Conn] is the handler's view of its connection, and its methods are
// safe from any goroutine at any time: a hub may push to subscribers, a
// proxy's other side may write, work handed off from a callback may answer
// later. Write queues output and never blocks; beyond
// Config.MaxPendingOutput it returns [ErrOutputFull], and OnDrain says when
// the producer may resume. CloseWrite half-closes, Close closes gracefully,
// Abort sends RST, Do runs a function on the connection's driver, and
// PauseRead and ResumeRead give backpressure on input. After the peer's FIN
// the engine answers with its own once the handler's output is flushed;
// a handler that must keep writing after it (a proxy relaying its
// upstream's answer) calls Hold and closes the connection itself. Once our
// side is shut down, Write returns [ErrShutdown]: nothing is sent after our
// FIN.
//
// # The Engine
//
// [Engine] is the sans-IO core that Server and ServeConn drive. It does no
// I/O and reads no clock: a driver asks [Engine.Next] which operation to
// perform (read, wait, write, close-write, close, abort), performs it, and
// reports the result with the time (ReadDone, WriteDone, CloseWriteDone,
// CloseDone, HandleTimeout). It thus runs under an event loop of your own,
// or on a test's virtual clock. The goroutine driver behind Server uses only
// this public API.
//
// # Promises
//
// Whatever the peer does: nothing reaches the transport after our
// half-close; every connection is closed exactly once, within the bounds
// its timeouts set ([Config.CloseBound]); no byte the handler wrote before
// shutdown is lost, reordered or cut off by an RST of ours; and the
// engine takes only the table's edges. Property tests check each promise
// over a simulated network on a virtual clock, and mutation tests show
// that each property catches a deliberate bug.
//
// [state diagram]: https://github.com/sockfsm/sockfsm/blob/main/docs/state-diagram.md
package sockfsm
