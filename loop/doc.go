// Package loop is an event-loop driver for sockfsm: its Server serves
// connections with the same Engine, Handler, Config and promises as
// sockfsm.Server, on a few event loops instead of a goroutine per
// connection, so that an idle connection costs its Engine and its
// descriptor and nothing more (no goroutine stack, no read buffer).
//
// On Linux the loops are epoll loops built on golang.org/x/sys/unix. On
// other systems there is no event loop: Server delegates to
// sockfsm.Server, the goroutine driver, with the same API and semantics
// (and logs once, at Info, that it does).
//
// # Loops and accepting
//
// Server runs Loops event loops that serve connections
// (runtime.GOMAXPROCS(0) by default) and one more that accepts them. Each
// is a goroutine with an epoll instance, an eventfd for wake-ups (in the
// epoll set edge-triggered, and the loop never reads it: each write is an
// edge, so a wake-up is one system call), a timerfd for its tick while it
// is busy, a timer heap and one read buffer
// of Config.ReadBufferSize shared by its connections. Each listener given
// to Serve is duplicated into the accepting loop's epoll set
// (level-triggered), and accept4 hands each new connection out,
// round-robin, to a serving loop, through that loop's mailbox and eventfd,
// as gnet's main reactor does. A turn does not accept until EAGAIN, which
// would cost a failed accept4 per turn: the listener, level-triggered, is
// reported while connections wait, so a turn makes one accept4 (as nginx
// accepts one per event by default), or, right after a turn that made all
// its calls (a queue is building), twice as many, up to 64. The accepting
// loop is a loop like the
// others that serves nothing. It costs a goroutine, three descriptors and
// its events array (no read buffer: a loop makes one at its first
// connection), and nothing while no one connects (it parks, see below).
// It pays for itself even with one serving loop on one CPU: accepts batch
// up while the serving loop works, and the serving loop sleeps less
// often. Against one loop that both accepted and served, the churn load's
// CPU per connection fell by 5 to 14% (about 9%; docs/performance.md). The
// price is the scheduler's: with one CPU, a connection that arrives while
// the serving loop is busy waits for the runtime to hand the CPU to the
// accepting loop, as with gnet's acceptor. Measured under an echo load,
// new connections' median latency rose (from 0.3–1 ms to 1–1.9 ms in the
// steady rounds) while their p99 steadied (10.6–13.1 ms against 8–68 ms).
// SO_REUSEPORT, with a listener per loop, would spread the accepts in the
// kernel instead, but it must be set before bind, on sockets Serve does
// not create; and, measured with two loops on two CPUs (when a serving
// loop still accepted), it cost no less than the one acceptor
// (docs/performance.md). At Config.MaxConns open connections the accepting
// loop stops watching the listener until one closes; on EMFILE, ENFILE and
// the other temporary accept errors it stops for a back-off of 5 ms
// doubling to 1 s, as sockfsm.Server does.
//
// # Readiness
//
// Connections are registered edge-triggered (EPOLLET), once, for EPOLLIN,
// EPOLLRDHUP and EPOLLPRI; EPOLLOUT is added only after a write found the
// socket full, and dropped again once our FIN is out (Linux reports a
// socket whose sending side is shut down writable forever). The loop
// keeps what it learnt from the edges (readable, writable, the peer's FIN
// seen) in the connection, reads until a short read or EAGAIN and writes
// until EAGAIN, so no readiness stays armed on a connection that cannot
// progress: a loop with nothing to do sleeps in epoll_wait until an edge,
// its next timer or
// a wake-up. A connection gets a budget of steps per turn; one that still
// has work is queued for the next turn, so a peer that floods cannot keep
// the loop from the others.
//
// TCP as the lifecycle wants it: a zero read (announced by EPOLLRDHUP) is
// the peer's FIN, after which the connection keeps sending. On a TCP
// connection that read is not made when its answer is known: after an
// edge with EPOLLRDHUP and neither EPOLLHUP, EPOLLERR nor EPOLLPRI, the
// peer's FIN is in and nothing (no reset, no unread urgent mark, at which
// Linux ends a read early) stops a short read from meaning the socket is
// empty; Linux then returns zero to every read, and the loop reports the
// EOF without one. This saves a system call on every connection whose
// request comes with its FIN, as the tutorial's client sends it. (Not on
// Unix sockets, where a read also ends early at a message that carries
// descriptors.) Reads and writes are recv(2) and send(2), which skip the
// file layer that read(2) and write(2) go through, with MSG_DONTWAIT;
// the writes pass MSG_NOSIGNAL, so a write that fails with EPIPE (on a
// Unix socket, any write after the peer's close) raises no SIGPIPE: a
// program that asked os/signal for SIGPIPE is not sent one by the loop's
// writes. (net's connections, and so the goroutine driver's and a
// Config.Prelude's, write with write(2), which raises it.) Our FIN is
// shutdown(SHUT_WR); an abort is SO_LINGER {1, 0} then close, which sends
// RST; ECONNRESET, EPIPE, ECONNABORTED and ENOTCONN are reported to the
// engine as the peer's reset (sockfsm.Classify), other errors as I/O
// errors. Accepted TCP connections get TCP_NODELAY, as net's do: on a
// plain TCP listener it is set once, on the listener, which Linux copies
// to the sockets it accepts (checked until one is seen with it), and on an
// MPTCP listener (net's default since Go 1.24) on each connection, before
// its second write: until then Nagle's algorithm holds nothing back, so a
// connection that writes once costs no setsockopt. No
// keep-alive is set (IdleTimeout and the linger bounds end dead peers),
// except on the TCP connections of a Config.Prelude, which net.FileConn
// gives net's keep-alive (below).
//
// # Timers
//
// Each engine has one deadline at a time (the deadline of its Next action).
// A loop keeps them in a binary heap: arming a later deadline than the one
// in the heap leaves the heap alone (the entry fires early, and is moved
// then), so a busy connection touches the heap about once per IdleTimeout,
// not once per read. Time is read from the monotonic clock (the wall
// clock once a second: nothing on the loop reads it).
//
// A loop first takes what is ready with a non-blocking epoll_wait. When
// nothing is, how it waits depends on its load. A busy loop yields once to
// the runtime (runtime.Gosched), then blocks in epoll_wait itself, without
// a timeout unless its first timer is due within 10 ms: under load the
// next event comes soon, and waking from epoll_wait is the cheapest way to
// get it, while a timeout would arm and cancel a kernel timer at every
// sleep. What bounds the sleep is a tick: a timerfd in the epoll set,
// every 10 ms while the loop is busy. A loop that has had nothing but
// ticks for a whole period is idle: its tick stops, and it parks in the
// runtime's network poller on its epoll descriptor, which is readable
// when events are ready, with its first timer as the read deadline; it
// then holds no P, and to the scheduler it is an ordinary parked
// goroutine. The distinction matters: a goroutine blocked in a system
// call keeps its P until sysmon takes it back, and with a loop per P, or
// one CPU, the process's other goroutines wait meanwhile. While a loop is
// busy, goroutines that are runnable run at each of its waits (the
// Gosched), and those waiting for the network or a timer are found by the
// runtime's sysmon, which polls the network when nobody has for 10 ms, as
// it does for any goroutine that keeps its P; an idle loop holds no P at
// all. (Parking every time, as this package did first, cost more context
// switches and system calls per connection under load than gnet, and a
// timeout on every busy wait about 8 µs of a churned connection's 62;
// see docs/performance.md.)
//
// # Handlers run on the loop
//
// The Handler's callbacks, Conn.Do's functions and Config's hooks
// (OnStateChange, OnClose) run on the connection's loop goroutine, and
// NewHandler and OnAccept on the accepting loop's; with a Config.Prelude,
// on the goroutine of the connection's prelude, so concurrently. A
// callback that blocks stalls every connection of its loop: hand blocking
// work to another goroutine, which may use the Conn at any time (Write, CloseWrite, Close, Abort, Do,
// PauseRead, ResumeRead wake the loop through its eventfd), exactly as with
// sockfsm.Server.
//
// # Config
//
// Every field of sockfsm.Config means what it means to sockfsm.Server:
// the engine's timeouts and limits, MaxConns, MaxConnsPerIP (refused at
// accept, or after a Config.Prelude by the address it gave, through
// OnRefuse), the hooks (OnAccept, OnStateChange, OnClose,
// OnAcceptError, OnMaxConnsWait, OnRefuse), and Prelude with
// PreludeTimeout (the PROXY protocol: package proxy).
//
// A prelude reads from a net.Conn, blocking, so it runs as on
// sockfsm.Server: on a goroutine of its own for each new connection, with
// the socket in the runtime's poller (net.FileConn), never on a loop.
// Then the socket goes to a serving loop, and the loop serves the socket
// itself, not the connection the prelude returned, with that connection's
// addresses: so it takes the result only if it is the connection the
// prelude was given or a sockfsm.Readdressed of it (proxy.Prelude's are:
// they read the header exactly and leave the rest in the socket), and
// refuses any other with ErrPrelude (and logs the first such refusal at
// Error: every connection will be refused alike).
//
// During its prelude a connection holds its MaxConns slot and is not in
// NumConns. Shutdown and Close cut preludes short and wait for them; a
// prelude that fails so is closed, not refused (proxy's Optional mode
// takes a cut for a missing header: its connection is served, and closed
// as the others are). A connection accepted when no descriptor or memory
// is left for the poller's duplicate (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
// held, with its slot, while the accepting loop backs off as for a failed
// accept (OnAcceptError sees the error), and is tried again when the
// back-off ends.
//
// The goroutine lasts as long as the prelude: a connection past its
// header costs what any other costs on the loop. The hand-over costs 19
// system calls per connection, counted with strace, 18 more than a
// connection without a prelude (the wake-up of the serving loop is common
// to both): the loop's duplicate of the socket, net.FileConn's own of
// that duplicate (with the runtime poller's registrations), its type,
// addresses and socket options (TCP_NODELAY and, on TCP, keep-alive), and
// the closes. The descriptor accept4 gave is kept for the loop, so nothing
// needs a new descriptor once the prelude is done. The header's own reads
// are package proxy's, the same on either driver.
//
// # What is not supported
//
// TLS: Serve refuses a listener other than *net.TCPListener and
// *net.UnixListener (a tls.Listener, say) with an error matching
// ErrUnsupportedListener: serve it with sockfsm.Server. ConnInfo.ID is
// numbered by this package, separately from sockfsm's own drivers.
//
// The driver uses the Engine's exported API only: it is a package of its
// own (TestNoBackdoor checks that it reaches no further than any other).
package loop
