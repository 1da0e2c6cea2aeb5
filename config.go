package sockfsm

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"runtime/debug"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// Default values for Config. Where a default comes from elsewhere, the
// comment says where.
const (
	// DefaultIdleTimeout is nginx's client_body_timeout and keepalive
	// order of magnitude: a minute of silence while Receiving.
	DefaultIdleTimeout = 60 * time.Second
	// DefaultWriteTimeout is the value of nginx's send_timeout. nginx
	// bounds the gap between two writes; sockfsm bounds each whole flush
	// (at most MaxPendingOutput bytes), so a peer that reads one byte a
	// minute cannot hold a connection forever: with the defaults a peer
	// must read at least 1 MiB a minute.
	DefaultWriteTimeout = 60 * time.Second
	// DefaultLingerTimeout is nginx's lingering_timeout.
	DefaultLingerTimeout = 5 * time.Second
	// DefaultLingerTime is nginx's lingering_time.
	DefaultLingerTime = 30 * time.Second
	// DefaultLingerBytes bounds what is read and discarded after our FIN.
	// nginx has no byte bound; 1 MiB is ample for a peer still finishing a
	// request and stops one that streams forever.
	DefaultLingerBytes = 1 << 20
	// DefaultReadBufferSize is the size of a read buffer, the largest chunk
	// handed to OnData.
	DefaultReadBufferSize = 16 << 10
	// DefaultMaxPendingOutput caps output queued and not yet flushed.
	DefaultMaxPendingOutput = 1 << 20
	// DefaultPreludeTimeout bounds Config.Prelude (the PROXY protocol
	// header). A load balancer sends the header with its first segment;
	// half go-proxyproto's 10s, and nginx has no default shorter than
	// its 30s proxy_protocol_timeout, but a header is a hundred bytes at
	// most and a peer that needs seconds for it is not a load balancer.
	DefaultPreludeTimeout = 5 * time.Second
	// DefaultMinRate is the input rate, in bytes per second, below which a
	// peer that trickles its input is closed (see Config.MinRate): 64 B/s,
	// 512 bit/s. A peer that trickles a byte every few seconds sends well
	// under it; an honest client sends far above it while it sends at all,
	// even on the slowest mobile link (GPRS, about 1 KiB/s upstream at
	// worst; EDGE and 3G tens to hundreds of KiB/s), so that a whole window
	// short of 640 bytes means a peer that spreads its bytes out, not a
	// slow link. It is below Apache mod_reqtimeout's 500 B/s because
	// sockfsm knows no request boundaries: see MinRate.
	DefaultMinRate = 64
	// DefaultMinRateWindow is the window over which MinRate is judged:
	// 10s, so that a mobile link's stalls (radio handovers, retransmission
	// timeouts of a few seconds) average out, and a trickler is closed
	// within 10s of its first byte, not the minute IdleTimeout allows
	// between bytes.
	DefaultMinRateWindow = 10 * time.Second
)

// Config holds a connection's timeouts and limits, and a server's. The zero
// value is ready to use: every field has a default.
//
// Durations and byte limits follow one scheme: zero means the default,
// a negative value means off (no bound). WriteTimeout and LingerTime cannot
// be turned off: without them a peer that never reads, or never stops
// sending after our FIN, would hold the connection forever.
type Config struct {
	// IdleTimeout ends a connection that sends nothing for this long while
	// Receiving: the engine half-closes it gracefully. Default 60s.
	IdleTimeout time.Duration
	// WriteTimeout bounds each flush of queued output, from its first
	// write to its last. A peer that does not read it in time is aborted
	// (RST). The time the handler takes to produce the output does not
	// count. Default 60s; cannot be off.
	WriteTimeout time.Duration
	// LingerTimeout bounds each read after our half-close. Default 5s.
	LingerTimeout time.Duration
	// LingerTime bounds the whole linger after our half-close. Default 30s;
	// cannot be off.
	LingerTime time.Duration
	// LingerBytes bounds the bytes read after our half-close. Default 1 MiB.
	LingerBytes int64
	// MaxLifetime, when on, starts a graceful close of a connection that has
	// been open this long. Default off: a peer that keeps talking keeps its
	// connection. Use it against peers that trickle input forever.
	MaxLifetime time.Duration

	// MinRate is the lowest input rate, in bytes per second, a peer may
	// keep up while it sends (Apache mod_reqtimeout's MinRate): IdleTimeout
	// measures silence, so without it a peer that trickles a byte every few
	// seconds holds its connection forever. The rate is judged over
	// windows of MinRateWindow, each starting at the first input read
	// while the connection is Receiving, reading is not paused, no output
	// waits to be flushed and the peer's FIN has not been read; any of
	// those ends the window, and the next starts at the next input. A
	// window that ends with fewer than MinRate×MinRateWindow bytes read
	// closes the connection gracefully (ReasonMinRate: our FIN, then the
	// linger). Silence starts no window: it is IdleTimeout's business.
	//
	// A peer whose input is answered restarts the window with each answer,
	// so request-response protocols pass whatever their requests' sizes;
	// a peer that sends less than MinRate×MinRateWindow bytes and then
	// waits without being answered does not. Turn it off (negative) for
	// protocols whose honest clients send small unanswered messages: small
	// heartbeats or keep-alives, telemetry lines, a subscription followed
	// by silence, a handler that answers from another goroutine after
	// more than MinRateWindow. Default 64 B/s (DefaultMinRate).
	MinRate int64
	// MinRateWindow is the window over which MinRate is judged. Default
	// 10s (DefaultMinRateWindow); negative turns MinRate off.
	MinRateWindow time.Duration

	// ReadBufferSize is the size of a read buffer: the largest chunk of
	// input handed to the handler. Default 16 KiB. Read buffers come from
	// a pool per size, shared by every connection of the process; over
	// TCP and Unix sockets on Unix systems, a connection borrows one only
	// when input is there and gives it back before it waits again
	// (transport.LazyReader), so an idle connection holds none. Over other
	// transports a connection holds one from start to close.
	ReadBufferSize int
	// MaxPendingOutput caps output queued by the handler and not yet
	// flushed; Write beyond it returns ErrOutputFull. Default 1 MiB.
	MaxPendingOutput int

	// MaxConns caps a Server's open connections; at the cap the server
	// stops accepting until one closes. Zero means unlimited.
	MaxConns int
	// MaxConnsPerIP caps the open connections of one source address
	// (nginx's limit_conn): beyond it a new connection is closed at once,
	// before any handler exists, and refused through OnRefuse with
	// ErrTooManyConnsFromIP; the other addresses' connections are not
	// affected. The address is the client's from the PROXY protocol header
	// when Prelude supplies it (see Prelude), else the peer's; IPv4-mapped
	// IPv6 addresses count as IPv4; connections from a peer without an IP
	// address (a Unix socket) are not limited. Zero means unlimited.
	MaxConnsPerIP int

	// Prelude, if set, runs on each accepted connection before the
	// connection exists for the engine: before ConnInfo, NewHandler and the
	// Engine. Package github.com/sockfsm/sockfsm/proxy provides one that
	// reads the PROXY protocol header. It returns the connection to serve:
	// c itself, or a net.Conn wrapping c whose RemoteAddr and LocalAddr
	// become ConnInfo's (a transport.Stream keeps the TCP adapter's lazy
	// reads). The event-loop driver (package loop), which serves the
	// socket itself, takes only c or a Readdressed of c (see
	// Readdressed). Server runs it on a goroutine of its own, never on the
	// accepting one, so a slow peer delays only itself, with c's deadline
	// set PreludeTimeout ahead and cleared after. If it returns an error,
	// c is closed at once and the connection refused through OnRefuse with
	// that error (wrapped in ErrPrelude unless it matches ErrProxyHeader or
	// ErrTooManyConnsFromIP). During Shutdown or Close the deadline moves
	// into the past, and a connection still in its prelude is closed
	// without being counted as refused. Listener runs preludes the same
	// way, off its caller's accept loop (see Listener).
	Prelude func(c net.Conn) (net.Conn, error)
	// PreludeTimeout bounds Prelude. Default 5s; cannot be off.
	PreludeTimeout time.Duration
	// OnRefuse, if set, is called once for each connection refused before
	// it was served: remote is the peer's address, or the client's from
	// the PROXY header once the prelude read it; reason matches
	// ErrTooManyConnsFromIP, ErrProxyHeader or ErrPrelude (RefusalReason
	// names it, for a metric's label). Every refusal is also logged once,
	// at warn level. It is called from the accepting goroutine or a
	// prelude's, and must not block.
	OnRefuse func(remote net.Addr, reason error)

	// OnAccept, if set, is called once per connection as it enters
	// Accepted, its first state: when its Engine is initialized (NewEngine,
	// Engine.Init), before any other hook, on the goroutine that
	// initializes it (Server's and Listener's accepting goroutine, or,
	// with a Prelude, the connection's prelude goroutine; ServeConn's
	// caller). Every connection OnAccept saw leaves Accepted
	// through OnStateChange and ends with one OnClose once its driver runs
	// it to Closed, so OnAccept, OnStateChange and OnClose together count
	// the connections open in each state exactly, including those still in
	// Accepted (a TLS handshake in progress), which OnStateChange alone
	// cannot see. It must not block. A panic aborts the connection
	// (ReasonHandlerPanic).
	OnAccept func(c ConnInfo)
	// OnStateChange, if set, is called on every transition, from the
	// connection's goroutine, before the handler hears of it. It must not
	// block.
	OnStateChange func(c ConnInfo, from, to fsm.State, ev fsm.Event)
	// OnClose, if set, is called once per connection, after the transport
	// is closed and after the handler's own OnClose, with how it ended:
	// the reason of an abort is reported here as well as to the handler.
	// It is called from the connection's goroutine and must not block.
	OnClose func(c ConnInfo, info CloseInfo)
	// OnAcceptError, if set, is called with each error a listener's
	// Accept returned, temporary or not, except the ones that follow the
	// server's own Shutdown or Close (a closed listener is not a fault).
	// Server's accept loop calls it before its back-off; Listener.Accept
	// calls it before returning the error. The event-loop driver (package
	// loop) also calls it when an accepted connection cannot get the
	// descriptor its Prelude needs (EMFILE and the like), before the same
	// back-off. It is called on the accepting goroutine and must not
	// block.
	OnAcceptError func(err error)
	// OnMaxConnsWait, if set, is called each time an accept loop that
	// waited at MaxConns open connections stops waiting, with how long it
	// waited: once a connection closed and freed a slot, or when the
	// server began to shut down. A loop that did not have to wait does
	// not call it. With several listeners, each loop reports its own
	// waits. It is called on the accepting goroutine and must not block.
	OnMaxConnsWait func(wait time.Duration)
	// Logger receives the engine's logs. Default slog.Default().
	Logger *slog.Logger
}

// ErrInvalidConfig is matched by every error Config.Validate returns.
var ErrInvalidConfig = errors.New("sockfsm: invalid config")

// Validate reports whether c is usable.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...)
	}
	switch {
	case c.WriteTimeout < 0:
		return bad("WriteTimeout cannot be off: a peer that stops reading would hold the connection forever")
	case c.LingerTime < 0:
		return bad("LingerTime cannot be off: a peer that never sends FIN would hold the connection forever")
	case c.ReadBufferSize < 0:
		return bad("ReadBufferSize %d is negative", c.ReadBufferSize)
	case c.MaxPendingOutput < 0:
		return bad("MaxPendingOutput %d is negative", c.MaxPendingOutput)
	case c.MaxConns < 0:
		return bad("MaxConns %d is negative", c.MaxConns)
	case c.MaxConnsPerIP < 0:
		return bad("MaxConnsPerIP %d is negative", c.MaxConnsPerIP)
	case c.PreludeTimeout < 0:
		return bad("PreludeTimeout cannot be off: a peer that never sends its prelude would hold a connection forever")
	case c.MinRate > maxMinRate:
		return bad("MinRate %d bytes per second is beyond any link (at most %d)", c.MinRate, int64(maxMinRate))
	case c.MinRateWindow > maxMinRateWindow:
		return bad("MinRateWindow %v is longer than %v", c.MinRateWindow, time.Duration(maxMinRateWindow))
	}
	return nil
}

// maxMinRate and maxMinRateWindow bound MinRate and MinRateWindow so that
// MinRate×MinRateWindow, the bytes a window needs, cannot overflow.
const (
	maxMinRate       = 1 << 40 // 1 TiB/s
	maxMinRateWindow = 24 * time.Hour
)

// limits is a validated Config with defaults filled in; a zero duration or
// byte count in limits means off.
type limits struct {
	idle, write, lingerTimeout, lingerTime, lifetime time.Duration
	lingerBytes                                      int64
	readBuf, maxOut                                  int
	// rateWindow is MinRateWindow and rateBytes the input a window
	// needs (MinRate×MinRateWindow); rateWindow is zero when MinRate is off.
	rateWindow time.Duration
	rateBytes  int64
}

func dur(v, def time.Duration) time.Duration {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

func (c Config) limits() limits {
	l := limits{
		idle:          dur(c.IdleTimeout, DefaultIdleTimeout),
		write:         dur(c.WriteTimeout, DefaultWriteTimeout),
		lingerTimeout: dur(c.LingerTimeout, DefaultLingerTimeout),
		lingerTime:    dur(c.LingerTime, DefaultLingerTime),
		lifetime:      dur(c.MaxLifetime, 0),
		lingerBytes:   int64(dur(time.Duration(c.LingerBytes), DefaultLingerBytes)),
		readBuf:       c.ReadBufferSize,
		maxOut:        c.MaxPendingOutput,
	}
	if l.readBuf == 0 {
		l.readBuf = DefaultReadBufferSize
	}
	if l.maxOut == 0 {
		l.maxOut = DefaultMaxPendingOutput
	}
	rate := int64(dur(time.Duration(c.MinRate), DefaultMinRate))
	if w := dur(c.MinRateWindow, DefaultMinRateWindow); rate > 0 && w > 0 {
		// Whole bytes, rounded up: a window needs at least one byte more
		// than a rate just below MinRate would bring.
		l.rateWindow = w
		l.rateBytes = int64(math.Ceil(float64(rate) * w.Seconds()))
	}
	return l
}

// CloseBound returns the longest a connection can stay open after the last
// activity, whatever the peer does next: the flush in progress, bounded by
// WriteTimeout, then the flush of what was queued meanwhile, bounded by
// WriteTimeout again (each flush of the bytes queued when it began has a
// WriteTimeout of its own, so that a peer that reads MaxPendingOutput per
// WriteTimeout is never aborted, however fast others push to it); an idle
// period bounded by IdleTimeout; then a linger bounded by LingerTime. The
// last activity is the peer's last input, the handler's last Write (from a
// callback or another goroutine) or ResumeRead, or the accept. A handler
// that writes only from its callbacks never has two flushes in a row, so
// its connections close within WriteTimeout less. The second result is
// false when IdleTimeout is off, in which case a silent peer is not bounded
// except by MaxLifetime (see LifetimeBound). MinRate only closes sooner: a
// window that ends short half-closes from Receiving, as IdleTimeout does,
// within MinRateWindow of the window's first input; the bound holds.
func (c Config) CloseBound() (time.Duration, bool) {
	l := c.limits()
	if l.idle == 0 {
		return 0, false
	}
	return 2*l.write + l.idle + l.lingerTime, true
}

// LifetimeBound returns the longest a connection can stay open after it
// was accepted when MaxLifetime is on: at MaxLifetime the engine asks for a
// graceful close (writes are refused from then on), the output queued is
// flushed (at most two flushes, each bounded by WriteTimeout), and the
// linger is bounded by LingerTime. The second result is false when
// MaxLifetime is off.
func (c Config) LifetimeBound() (time.Duration, bool) {
	l := c.limits()
	if l.lifetime == 0 {
		return 0, false
	}
	return l.lifetime + 2*l.write + l.lingerTime, true
}

// RunPrelude calls c.Prelude on conn as Server does, for a driver of its
// own: a panic, a nil connection, or an error that matches none of
// ErrProxyHeader, ErrTooManyConnsFromIP and ErrPrelude, becomes an error
// matching ErrPrelude (a panic's carries a *PanicError). The caller sets
// conn's deadline (PreludeTimeout) and closes conn on an error.
func (c Config) RunPrelude(conn net.Conn) (nc net.Conn, err error) {
	defer func() {
		if r := recover(); r != nil {
			nc, err = nil, fmt.Errorf("%w: %w", ErrPrelude, &PanicError{Value: r, Stack: debug.Stack()})
		}
	}()
	nc, err = c.Prelude(conn)
	switch {
	case err == nil && nc == nil:
		err = fmt.Errorf("%w: Prelude returned no connection", ErrPrelude)
	case err != nil && !errors.Is(err, ErrProxyHeader) && !errors.Is(err, ErrTooManyConnsFromIP) && !errors.Is(err, ErrPrelude):
		err = fmt.Errorf("%w: %w", ErrPrelude, err)
	}
	return nc, err
}

// Readdressed is implemented by a connection that a Config.Prelude returns
// in place of the connection it was given when it is that connection under
// other addresses, as proxy.Prelude's are (with the client's address from
// the PROXY header): its reads and writes are the given connection's, it
// holds nothing of its own, and the prelude read nothing from the given
// connection beyond its own bytes, so the rest of the peer's data is still
// in the socket. Readdressed returns the connection the prelude was given
// (or another Readdressed of it, for a prelude that wraps another's).
//
// The event-loop driver (package loop) serves the socket itself, not the
// connection a Prelude returns, with that connection's addresses; it
// closes the connection the prelude was given, never the one returned.
// So it takes a Prelude's result only if it is the connection given or a
// Readdressed of it, and refuses any other with ErrPrelude, since data a
// wrapper buffered or transformed would not reach the handler.
type Readdressed interface {
	net.Conn
	Readdressed() net.Conn
}
