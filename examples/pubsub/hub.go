package main

import (
	"bytes"
	"errors"
	"log/slog"
	"sync"

	"github.com/sockfsm/sockfsm"
)

// Options configure a Hub.
type Options struct {
	// MaxFull is the slow-subscriber policy: a subscriber whose output is
	// full is paused, and the messages published while it is paused are
	// dropped for it; once more than MaxFull of them in a row were dropped,
	// it is closed gracefully. 0 closes it at the first dropped message;
	// DefaultMaxFull is a reasonable value.
	MaxFull int
	// MaxLine is the longest line a client may send, newline included; a
	// client that sends a longer one is closed. 0 means DefaultMaxLine.
	MaxLine int
	// Logger receives the hub's logs. Default: slog.Default().
	Logger *slog.Logger
	// OnEvict, if set, is called on the hub's goroutine when a subscriber
	// is closed by the slow-subscriber policy, with the number of messages
	// dropped for it in a row. It must not block.
	OnEvict func(info sockfsm.ConnInfo, dropped int)
}

// Defaults of Options.
const (
	DefaultMaxFull = 64
	DefaultMaxLine = 4 << 10
)

// Stats are the hub's counters.
type Stats struct {
	// Subscribers is the number of connections subscribed now: open and
	// not closing.
	Subscribers int
	// Published counts the lines received from clients.
	Published int64
	// Delivered counts the messages queued to a subscriber (whole, or
	// queued in part with the rest held for it until its output drains).
	Delivered int64
	// Dropped counts the messages not delivered to a paused subscriber.
	Dropped int64
	// Pauses counts the times a subscriber was paused: its Write returned
	// sockfsm.ErrOutputFull.
	Pauses int64
	// Evicted counts the subscribers closed by the slow-subscriber policy.
	Evicted int64
	// MaxHeld is the most output ever held for one subscriber at once:
	// what its connection had queued (Conn.Buffered) plus the rest of a
	// message the hub keeps for it while it is paused. The policy bounds it
	// by Config.MaxPendingOutput + Options.MaxLine.
	MaxHeld int
}

// Hub is a publish/subscribe room on sockfsm: every connection is a
// subscriber, and each line one sends is pushed to all the others.
//
// One goroutine, the hub's, owns the subscribers and does all the pushing
// with Conn.Write, from outside the connections' callbacks. Conn.Write never
// blocks; it refuses output beyond Config.MaxPendingOutput with
// sockfsm.ErrOutputFull, queuing what fits. The hub then pauses that
// subscriber: it keeps the unqueued rest of that one message, drops the
// messages that follow for it, and resumes it when its DrainHandler.OnDrain
// reports the queue flushed (the rest of the message first, so no
// subscriber ever sees a torn line while it stays subscribed). A subscriber
// paused for more than Options.MaxFull messages in a row is closed
// gracefully with Conn.Close: what was queued for it is flushed, then our
// FIN. Memory per subscriber is thus bounded, whatever it does.
type Hub struct {
	opts   Options
	log    *slog.Logger
	events chan event
	done   chan struct{} // closed by Close
	exited chan struct{} // closed when run returns
	once   sync.Once

	// Owned by run.
	subs  map[*subscriber]struct{}
	stats Stats
}

// eventKind says what an event is.
type eventKind uint8

const (
	evJoin eventKind = iota
	evLeave
	evPublish
	evDrain
	evStats
)

// event is a message to the hub's goroutine.
type event struct {
	kind  eventKind
	sub   *subscriber
	line  []byte       // evPublish: the line, newline included; the hub owns it
	stats chan<- Stats // evStats: where to send the counters
}

// NewHub returns a hub and starts its goroutine. Close stops it.
func NewHub(o Options) *Hub {
	o.MaxFull = max(o.MaxFull, 0)
	if o.MaxLine <= 0 {
		o.MaxLine = DefaultMaxLine
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	h := &Hub{
		opts:   o,
		log:    log,
		events: make(chan event, 256),
		done:   make(chan struct{}),
		exited: make(chan struct{}),
		subs:   map[*subscriber]struct{}{},
	}
	go h.run()
	return h
}

// Close stops the hub's goroutine and waits for it. Shut the server down
// first: once the hub is closed, lines are no longer pushed.
func (h *Hub) Close() {
	h.once.Do(func() { close(h.done) })
	<-h.exited
}

// Stats returns the hub's counters; the zero Stats once the hub is closed.
func (h *Hub) Stats() Stats {
	ch := make(chan Stats, 1)
	if !h.send(event{kind: evStats, stats: ch}) {
		return Stats{}
	}
	select {
	case s := <-ch:
		return s
	case <-h.exited:
		return Stats{}
	}
}

// NewHandler returns the handler of a new connection: use it as
// sockfsm.Server.NewHandler.
func (h *Hub) NewHandler(info sockfsm.ConnInfo) sockfsm.Handler {
	return &subscriber{hub: h, info: info}
}

// send hands ev to the hub's goroutine and reports whether it took it. It
// blocks while the hub's queue is full: the hub never blocks, so a publisher
// that outruns it is held back by TCP flow control.
func (h *Hub) send(ev event) bool {
	select {
	case h.events <- ev:
		return true
	case <-h.done:
		return false
	}
}

func (h *Hub) run() {
	defer close(h.exited)
	for {
		select {
		case ev := <-h.events:
			h.handle(ev)
		case <-h.done:
			return
		}
	}
}

func (h *Hub) handle(ev event) {
	s := ev.sub
	switch ev.kind {
	case evJoin:
		h.subs[s] = struct{}{}
	case evLeave:
		delete(h.subs, s)
	case evPublish:
		h.stats.Published++
		for t := range h.subs {
			if t != s {
				h.deliver(t, ev.line)
			}
		}
	case evDrain:
		h.resume(s)
	case evStats:
		st := h.stats
		for t := range h.subs {
			if !t.gone {
				st.Subscribers++
			}
		}
		ev.stats <- st
	}
}

// deliver pushes one message to s, or drops it if s is paused.
func (h *Hub) deliver(s *subscriber, msg []byte) {
	if s.gone {
		return
	}
	if s.paused {
		h.stats.Dropped++
		s.dropped++
		if s.dropped > h.opts.MaxFull {
			h.evict(s)
		}
		return
	}
	n, err := s.conn.Write(msg)
	switch {
	case err == nil:
		h.stats.Delivered++
	case errors.Is(err, sockfsm.ErrOutputFull):
		// Queued in part: keep the rest, and send it first once OnDrain
		// says the queue has been flushed.
		h.stats.Delivered++
		h.stats.Pauses++
		s.paused = true
		s.tail = append(s.tail[:0], msg[n:]...)
	default: // sockfsm.ErrShutdown: the connection is closing
		s.gone = true
	}
	h.held(s)
}

// resume sends what was kept for s and lets messages through again. It runs
// when s's OnDrain says its queue was flushed after an ErrOutputFull.
func (h *Hub) resume(s *subscriber) {
	if !s.paused || s.gone {
		return
	}
	n, err := s.conn.Write(s.tail)
	switch {
	case err == nil:
		s.paused, s.dropped, s.tail = false, 0, s.tail[:0]
	case errors.Is(err, sockfsm.ErrOutputFull):
		// A message larger than MaxPendingOutput: the next OnDrain sends
		// more of it.
		s.tail = append(s.tail[:0], s.tail[n:]...)
	default:
		s.gone = true
	}
	h.held(s)
}

// evict closes a subscriber that stayed full for too long: gracefully, so
// that it still receives what was queued for it, then our FIN.
func (h *Hub) evict(s *subscriber) {
	s.gone = true
	h.stats.Evicted++
	h.log.Info("closing a slow subscriber", "conn", s.info.ID, "remote", addr(s.info), "dropped", s.dropped)
	if h.opts.OnEvict != nil {
		h.opts.OnEvict(s.info, s.dropped)
	}
	s.tail = nil
	s.conn.Close() // ErrClosed if it is closing already: nothing to do
}

// held records the output held for s.
func (h *Hub) held(s *subscriber) {
	if n := s.conn.Buffered() + len(s.tail); n > h.stats.MaxHeld {
		h.stats.MaxHeld = n
	}
}

func addr(info sockfsm.ConnInfo) string {
	if info.RemoteAddr == nil {
		return ""
	}
	return info.RemoteAddr.String()
}

// subscriber is the handler of one connection: it splits the client's input
// into lines and hands them to the hub. Its hub-side fields are the hub
// goroutine's alone.
type subscriber struct {
	hub  *Hub
	info sockfsm.ConnInfo
	conn *sockfsm.Conn

	// The connection's callbacks only.
	partial []byte // the line being received
	refused bool   // the client sent a line longer than MaxLine

	// The hub's goroutine only.
	paused  bool   // the last Write was refused: waiting for OnDrain
	tail    []byte // the rest of the message that did not fit
	dropped int    // messages dropped in a row while paused
	gone    bool   // closing: write nothing more
}

// OnOpen subscribes the connection.
func (s *subscriber) OnOpen(c *sockfsm.Conn) {
	s.conn = c
	s.hub.send(event{kind: evJoin, sub: s})
}

// OnData publishes each complete line of p.
func (s *subscriber) OnData(c *sockfsm.Conn, p []byte) {
	if s.refused {
		return
	}
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			s.partial = append(s.partial, p...)
			if len(s.partial) >= s.hub.opts.MaxLine {
				s.refuse(c)
			}
			return
		}
		if len(s.partial)+i+1 > s.hub.opts.MaxLine {
			s.refuse(c)
			return
		}
		line := make([]byte, 0, len(s.partial)+i+1)
		line = append(append(line, s.partial...), p[:i+1]...)
		s.partial = s.partial[:0]
		p = p[i+1:]
		s.hub.send(event{kind: evPublish, sub: s, line: line})
	}
}

// refuse closes a client that sent a line longer than MaxLine.
func (s *subscriber) refuse(c *sockfsm.Conn) {
	s.refused, s.partial = true, nil
	s.hub.log.Info("closing a client: line too long", "conn", s.info.ID, "remote", addr(s.info), "max", s.hub.opts.MaxLine)
	c.Close()
}

// OnPeerClose publishes a last line the client did not end with a newline.
// The engine then flushes, half-closes and closes the connection.
func (s *subscriber) OnPeerClose(*sockfsm.Conn) {
	if len(s.partial) > 0 && !s.refused {
		line := append(s.partial, '\n')
		s.partial = nil
		s.hub.send(event{kind: evPublish, sub: s, line: line})
	}
}

// OnDrain tells the hub that the subscriber's output was flushed after an
// ErrOutputFull.
func (s *subscriber) OnDrain(*sockfsm.Conn) {
	s.hub.send(event{kind: evDrain, sub: s})
}

// OnClose unsubscribes the connection.
func (s *subscriber) OnClose(*sockfsm.Conn, sockfsm.CloseInfo) {
	s.hub.send(event{kind: evLeave, sub: s})
}
