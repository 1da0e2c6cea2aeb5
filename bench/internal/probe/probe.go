// Package probe is what the measurement tools under bench/ share: the
// loopback checks that keep them from loading anything but this machine, the
// readers of a process's /proc files (resident memory, threads, open
// descriptors, CPU time), and the classification of a socket error as the
// peer's reset or a timeout.
//
// bench/loadgen, bench/soak and the benchmark servers (bench/plainecho,
// bench/minimal) use it; it is not part of sockfsm's API.
package probe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"syscall"
	"time"
)

// ErrNotLoopback is returned (wrapped) by the loopback checks for an
// address that is not on this machine's loopback.
var ErrNotLoopback = errors.New("probe: not a loopback address (127.0.0.0/8, ::1 or localhost)")

// CheckLoopback returns an error unless addr (host:port) names a host that
// is "localhost" or a loopback IP address. It resolves nothing, and accepts
// any port, 0 included (a listener's choice).
func CheckLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("%q: %w", addr, ErrNotLoopback)
}

// ResolveLoopback resolves addr (host:port) and returns it with its host
// replaced by one of its IP addresses, IPv4 first. It refuses a name any of
// whose addresses is not a loopback address, so that the address dialed is
// the one checked.
func ResolveLoopback(ctx context.Context, addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "" {
		return "", fmt.Errorf("%s: no host: name a loopback address", addr)
	}
	var ips []net.IP
	if ip := net.ParseIP(host); ip != nil {
		ips = []net.IP{ip}
	} else {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		ias, err := net.DefaultResolver.LookupIPAddr(ctx, host)
		if err != nil {
			return "", err
		}
		for _, ia := range ias {
			ips = append(ips, ia.IP)
		}
	}
	if len(ips) == 0 {
		return "", fmt.Errorf("%s resolves to no address", host)
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return "", fmt.Errorf("%s: %w", ip, ErrNotLoopback)
		}
	}
	slices.SortStableFunc(ips, func(a, b net.IP) int {
		switch {
		case a.To4() != nil && b.To4() == nil:
			return -1
		case a.To4() == nil && b.To4() != nil:
			return 1
		}
		return 0
	})
	return net.JoinHostPort(ips[0].String(), port), nil
}

// IsReset reports whether err is the peer's reset: ECONNRESET, or EPIPE (a
// write on a connection the peer has reset).
func IsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// IsTimeout reports whether err is a deadline passing.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}
