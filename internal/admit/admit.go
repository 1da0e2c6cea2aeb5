// Package admit holds the accounting shared by sockfsm's drivers when they
// decide whether to serve a new connection: the open connections of each
// source address, for Config.MaxConnsPerIP (nginx's limit_conn). The
// goroutine driver (Server, Listener) and an event-loop driver use the same
// Limiter, so that they count, refuse and release alike.
package admit

import (
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
)

// Limiter counts the open connections of each source address and admits a
// new one only below its limit. A nil *Limiter admits everything. It is
// safe for concurrent use.
type Limiter struct {
	max int
	mu  sync.Mutex
	n   map[netip.Addr]int // only addresses with open connections
}

// New returns a Limiter that admits at most max open connections per
// address, or nil (no limit) if max <= 0.
func New(max int) *Limiter {
	if max <= 0 {
		return nil
	}
	return &Limiter{max: max, n: map[netip.Addr]int{}}
}

// Key returns the address a connection from remote is counted under: its
// IP address, an IPv4-mapped IPv6 address as IPv4, without a zone. It
// returns false for an address that is not an IP address (a Unix socket's
// peer): such connections are not limited.
func Key(remote net.Addr) (netip.Addr, bool) {
	var ip net.IP
	switch a := remote.(type) {
	case *net.TCPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	case *net.IPAddr:
		ip = a.IP
	case *net.UnixAddr:
		return netip.Addr{}, false // whatever its name: a path may read as an address
	default:
		if remote == nil {
			return netip.Addr{}, false
		}
		ap, err := netip.ParseAddrPort(remote.String())
		if err != nil {
			return netip.Addr{}, false
		}
		return ap.Addr().Unmap().WithZone(""), true
	}
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// Acquire counts a new connection from a and reports whether it is
// admitted: false, with nothing counted, if a already has the maximum
// open. Every admitted connection must be released once, when it closes.
func (l *Limiter) Acquire(a netip.Addr) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.n[a]
	if n >= l.max {
		return false
	}
	l.n[a] = n + 1
	return true
}

// Release forgets an admitted connection from a that closed.
func (l *Limiter) Release(a netip.Addr) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch n := l.n[a]; {
	case n > 1:
		l.n[a] = n - 1
	case n == 1:
		delete(l.n, a)
	default:
		panic("admit: Release of " + a.String() + " without Acquire")
	}
}

// Open returns the number of open connections counted for a.
func (l *Limiter) Open(a netip.Addr) int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[a]
}

// Addrs returns the number of addresses with open connections: the
// Limiter's memory is proportional to it.
func (l *Limiter) Addrs() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.n)
}

// Refuse reports a connection refused before it was served, the same way
// from every driver: logged once at warn level, then passed to onRefuse
// (Config.OnRefuse) if it is set. A panic in onRefuse is logged, not
// propagated: it runs on an accepting goroutine.
func Refuse(log *slog.Logger, onRefuse func(net.Addr, error), remote net.Addr, reason error) {
	addr := "unknown"
	if remote != nil {
		addr = remote.String()
	}
	log.Warn("connection refused", "remote", addr, "reason", reason)
	if onRefuse == nil {
		return
	}
	defer func() {
		if r := recover(); r != nil {
			log.Error("OnRefuse panicked", "panic", r, "stack", string(debug.Stack()))
		}
	}()
	onRefuse(remote, reason)
}
