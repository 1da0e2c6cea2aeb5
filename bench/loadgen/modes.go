package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm/bench/internal/probe"
)

// dialConcurrency bounds the connects in flight in idle and echo mode.
const dialConcurrency = 128

// tally counts the outcomes of ops, from many goroutines.
type tally struct {
	ops, errors, resets, mismatches, eofs atomic.Int64

	mu       sync.Mutex
	firstErr error
}

// fail counts a failed op: a reset if err is the server's reset
// (probe.IsReset), an error otherwise.
func (t *tally) fail(err error) {
	if probe.IsReset(err) {
		t.resets.Add(1)
	} else {
		t.errors.Add(1)
	}
	t.mu.Lock()
	if t.firstErr == nil {
		t.firstErr = err
	}
	t.mu.Unlock()
}

// mismatch counts an op whose echo differed.
func (t *tally) mismatch(what string) {
	t.mismatches.Add(1)
	t.mu.Lock()
	if t.firstErr == nil {
		t.firstErr = errors.New(what)
	}
	t.mu.Unlock()
}

func (t *tally) result(elapsed time.Duration, lat *hist) *result {
	t.mu.Lock()
	defer t.mu.Unlock()
	return &result{
		elapsed: elapsed, lat: lat,
		ops: t.ops.Load(), errors: t.errors.Load(), resets: t.resets.Load(),
		mismatches: t.mismatches.Load(), eofs: t.eofs.Load(),
		firstErr: t.firstErr, rssBefore: -1, rssAfter: -1, shutdown: -1,
	}
}

// dialer returns the dialer of connection (or churn worker) i: bound to
// -sources' addresses in turn, if set.
func dialer(o options, i int) *net.Dialer {
	d := &net.Dialer{Timeout: o.timeout}
	if len(o.sources) > 0 {
		d.LocalAddr = &net.TCPAddr{IP: o.sources[i%len(o.sources)]}
	}
	return d
}

// fill writes a pattern unique to seq into p.
func fill(p []byte, seq uint64) {
	for i := range p {
		p[i] = byte(seq>>(8*(i%8))) ^ byte(i*131+7)
	}
}

// closeGracefully half-closes c, reads to EOF and closes c. It returns the
// bytes read after the half-close (an echo server sends none) and the error.
func closeGracefully(c *net.TCPConn, timeout time.Duration) (int64, error) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	return io.Copy(io.Discard, c)
}

// dialAll opens n connections, at most dialConcurrency at a time; the ones
// that fail are counted in t and left nil.
func dialAll(ctx context.Context, o options, t *tally) []*net.TCPConn {
	conns := make([]*net.TCPConn, o.conns)
	sem := make(chan struct{}, dialConcurrency)
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := dialer(o, i).DialContext(ctx, "tcp", o.addr)
			if err != nil {
				t.fail(err)
				return
			}
			conns[i] = c.(*net.TCPConn)
		})
	}
	wg.Wait()
	return conns
}

// runEcho is -mode echo.
func runEcho(ctx context.Context, o options, log *slog.Logger) *result {
	var t tally
	conns := dialAll(ctx, o, &t)
	open := 0
	for _, c := range conns {
		if c != nil {
			open++
		}
	}
	if open == 0 {
		r := t.result(0, &hist{})
		r.dialFailed = true
		return r
	}
	log.Info("connected", "conns", open, "size", o.size, "duration", o.duration, "n", o.n)

	lat := newShardedHist(o.conns)
	var budget atomic.Int64
	budget.Store(o.n)
	start := time.Now()
	end := start.Add(o.duration)
	healthy := make([]bool, len(conns))
	var wg sync.WaitGroup
	for w, c := range conns {
		if c == nil {
			continue
		}
		wg.Go(func() {
			healthy[w] = echoLoop(ctx, w, c, o, end, &budget, &t, lat)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	for w, c := range conns {
		if c == nil {
			continue
		}
		if !healthy[w] {
			c.Close()
			continue
		}
		wg.Go(func() {
			n, err := closeGracefully(c, o.timeout)
			switch {
			case err != nil:
				t.fail(fmt.Errorf("graceful close: %w", err))
			case n > 0:
				t.mismatch(fmt.Sprintf("graceful close: %d unexpected bytes after our FIN", n))
			}
		})
	}
	wg.Wait()
	return t.result(elapsed, lat.total())
}

// echoLoop does round trips on c until end, ctx's end or the budget's (if
// o.n is set). It reports whether c is still usable.
func echoLoop(ctx context.Context, w int, c *net.TCPConn, o options, end time.Time, budget *atomic.Int64, t *tally, lat *shardedHist) bool {
	send := make([]byte, o.size)
	recv := make([]byte, o.size)
	seq := uint64(w) << 40
	for ctx.Err() == nil {
		t0 := time.Now()
		if !t0.Before(end) || (o.n > 0 && budget.Add(-1) < 0) {
			break
		}
		fill(send, seq)
		seq++
		c.SetDeadline(t0.Add(o.timeout))
		if _, err := c.Write(send); err != nil {
			t.fail(err)
			return false
		}
		if _, err := io.ReadFull(c, recv); err != nil {
			t.fail(err)
			return false
		}
		d := time.Since(t0)
		if !bytes.Equal(send, recv) {
			t.mismatch(fmt.Sprintf("connection %d: echo differs from the %d bytes sent", w, o.size))
			return false
		}
		lat.record(w, d)
		t.ops.Add(1)
	}
	return true
}

// tutorial is the Winsock tutorial's payload, churn's default.
var tutorial = []byte("this is a test")

// runChurn is -mode churn.
func runChurn(ctx context.Context, o options, log *slog.Logger) *result {
	var t tally
	lat := newShardedHist(o.conns)
	var budget atomic.Int64
	budget.Store(o.n)
	log.Info("churning", "workers", o.conns, "size", o.size, "duration", o.duration, "n", o.n)
	start := time.Now()
	end := start.Add(o.duration)
	var wg sync.WaitGroup
	for w := range o.conns {
		wg.Go(func() { churnLoop(ctx, w, o, end, &budget, &t, lat) })
	}
	wg.Wait()
	r := t.result(time.Since(start), lat.total())
	if r.ops == 0 && r.errors > 0 {
		r.dialFailed = true
	}
	return r
}

// churnLoop opens connections one after the other until end, ctx's end or
// the budget's.
func churnLoop(ctx context.Context, w int, o options, end time.Time, budget *atomic.Int64, t *tally, lat *shardedHist) {
	payload := make([]byte, o.size)
	if o.size == len(tutorial) {
		copy(payload, tutorial)
	} else {
		fill(payload, uint64(w))
	}
	buf := make([]byte, o.size+1) // one more: an echo that is too long is caught
	d := dialer(o, w)
	if src := churnSource(o.addr, w); src != nil && d.LocalAddr == nil {
		d.LocalAddr = src
	}
	defaultSource := len(o.sources) == 0
	for ctx.Err() == nil {
		t0 := time.Now()
		if !t0.Before(end) || (o.n > 0 && budget.Add(-1) < 0) {
			return
		}
		nc, err := d.DialContext(ctx, "tcp", o.addr)
		if err != nil && defaultSource && d.LocalAddr != nil && errors.Is(err, syscall.EADDRNOTAVAIL) {
			// Only 127.0.0.1 is configured (macOS, say): one source.
			d.LocalAddr = nil
			nc, err = d.DialContext(ctx, "tcp", o.addr)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			t.fail(err)
			// A refused or failed connect is fast: pause so that a dead
			// server does not spin the loop.
			select {
			case <-ctx.Done():
			case <-time.After(time.Millisecond):
			}
			continue
		}
		c := nc.(*net.TCPConn)
		got, err := churnOne(c, t0.Add(o.timeout), payload, buf)
		c.Close()
		switch {
		case err != nil:
			t.fail(err)
		case !bytes.Equal(buf[:got], payload):
			t.mismatch(fmt.Sprintf("worker %d: echo of %d bytes differs from the %d sent", w, got, len(payload)))
		default:
			lat.record(w, time.Since(t0))
			t.ops.Add(1)
		}
	}
}

// churnSources is how many loopback source addresses churn's workers
// connect from. With one, the client's ephemeral ports limit the rate, not
// the server: each connection leaves a port in TIME_WAIT on the client (it
// sends the first FIN), and Linux reuses such a port only once its last
// timestamp is a second old, which caps churn at about 14,000 connections
// a second on the default 28,232 ports and makes p99 a measure of the
// client's port search (docs/performance.md).
const churnSources = 32

// churnSource returns the source address worker w connects from, to a
// server at addr: 127.0.0.2 up to 127.0.0.(churnSources+1) for a server on
// 127.0.0.0/8 (all of it routes to the loopback on Linux); nil otherwise
// (::1 is the only IPv6 loopback address).
func churnSource(addr string, w int) *net.TCPAddr {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil
	}
	ip := net.ParseIP(host).To4()
	if ip == nil || !ip.IsLoopback() {
		return nil
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+w%churnSources))}
}

// churnOne sends payload on c, half-closes and reads to EOF into buf; it
// returns the bytes read.
func churnOne(c *net.TCPConn, deadline time.Time, payload, buf []byte) (int, error) {
	c.SetDeadline(deadline)
	if _, err := c.Write(payload); err != nil {
		return 0, err
	}
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	got := 0
	for got < len(buf) {
		n, err := c.Read(buf[got:])
		got += n
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
	return got, nil // too long: the caller's comparison fails
}

// runIdle is -mode idle.
func runIdle(ctx context.Context, o options, log *slog.Logger) *result {
	var t tally
	lat := newShardedHist(1)
	rssBefore, rssAfter := int64(-1), int64(-1)
	var note string
	if o.pid > 0 {
		var err error
		if rssBefore, err = probe.RSS(o.pid); err != nil {
			note = err.Error()
			rssBefore = -1
		}
	}

	// Each connection's reader waits for the server's FIN (or the echo of
	// its ping, first) until this deadline at the latest: the dials, the
	// hold, and a bound on the server's shutdown or the answers to our FINs.
	readDeadline := time.Now().Add(o.duration + shutdownBound(o) + time.Duration(o.conns/dialConcurrency+1)*o.timeout)
	var ourClose atomic.Bool // set before we half-close: EOFs after it answer our FIN
	var closed atomic.Int64  // connections whose reader is done

	conns := make([]*net.TCPConn, o.conns)
	done := make([]chan struct{}, o.conns)
	sem := make(chan struct{}, dialConcurrency)
	var dialing, readers sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		dialing.Go(func() {
			defer func() { <-sem }()
			t0 := time.Now()
			nc, err := dialer(o, i).DialContext(ctx, "tcp", o.addr)
			if err != nil {
				t.fail(err)
				return
			}
			c := nc.(*net.TCPConn)
			ping := []byte{byte('a' + i%26)}
			c.SetDeadline(t0.Add(o.timeout))
			var pong [1]byte
			if _, err := c.Write(ping); err != nil {
				t.fail(err)
				c.Close()
				return
			}
			if _, err := io.ReadFull(c, pong[:]); err != nil {
				t.fail(err)
				c.Close()
				return
			}
			if pong[0] != ping[0] {
				t.mismatch("ping echoed wrong")
				c.Close()
				return
			}
			lat.record(0, time.Since(t0))
			t.ops.Add(1)
			c.SetDeadline(time.Time{})
			c.SetReadDeadline(readDeadline)
			conns[i], done[i] = c, make(chan struct{})
			readers.Go(func() {
				defer close(done[i])
				idleReader(c, &t, &ourClose, o.timeout)
				closed.Add(1)
			})
		})
	}
	dialing.Wait()
	established := t.ops.Load()
	if established == 0 {
		r := t.result(0, lat.total())
		r.dialFailed = true
		r.rssNote = note
		return r
	}
	log.Info("holding idle connections", "conns", established, "failed", o.conns-int(established), "duration", o.duration)

	// Hold: until -duration has passed, ctx ends, or the server has closed
	// every connection.
	start := time.Now()
	holdEnd := start.Add(o.duration)
	settle := start.Add(min(o.duration/2, time.Second))
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	sampled := false
	sample := func() {
		if o.pid <= 0 || t.eofs.Load() > 0 || t.resets.Load() > 0 || closed.Load() > 0 {
			return // measure only while every connection is open
		}
		if rss, err := probe.RSS(o.pid); err == nil {
			rssAfter = rss
		} else {
			note = err.Error()
		}
	}
hold:
	for {
		now := time.Now()
		if !sampled && !now.Before(settle) {
			sample()
			sampled = true
		}
		if !now.Before(holdEnd) || closed.Load() >= established {
			break
		}
		select {
		case <-ctx.Done():
			break hold
		case <-tick.C:
		}
	}
	sample()
	elapsed := time.Since(start)
	if n := t.eofs.Load(); n > 0 {
		log.Info("the server closed connections during the hold", "closed", n, "of", established)
	}
	shutdown := time.Duration(-1)
	if o.shutdown && ctx.Err() == nil {
		shutdown = shutDown(ctx, o, log, &closed, established)
	}

	// Close ours gracefully: our FIN; each reader sees the server's answer.
	ourClose.Store(true)
	for i, c := range conns {
		if c == nil {
			continue
		}
		select {
		case <-done[i]:
			continue // the reader already closed it
		default:
		}
		c.SetDeadline(time.Now().Add(o.timeout))
		c.CloseWrite()
	}
	readers.Wait()
	r := t.result(elapsed, lat.total())
	r.rssBefore, r.rssAfter, r.rssNote = rssBefore, rssAfter, note
	if rssBefore < 0 {
		r.rssAfter = -1
	}
	r.shutdown = shutdown
	return r
}

// shutdownBound bounds the wait for the server's closes after SIGTERM
// (-shutdown), or for the answers to our FINs.
func shutdownBound(o options) time.Duration { return 4 * o.timeout }

// shutDown sends SIGTERM to the server (-pid) and waits until the server has
// closed every connection (closed reaches established: each reader has seen
// its FIN or its reset), ctx ends, or shutdownBound passes. It returns the
// time from the signal to the last close seen, or -1 if the signal could
// not be sent.
func shutDown(ctx context.Context, o options, log *slog.Logger, closed *atomic.Int64, established int64) time.Duration {
	p, err := os.FindProcess(o.pid)
	if err == nil {
		err = p.Signal(syscall.SIGTERM)
	}
	if err != nil {
		log.Error("cannot send the server SIGTERM", "pid", o.pid, "err", err)
		return -1
	}
	start := time.Now()
	bound := time.NewTimer(shutdownBound(o))
	defer bound.Stop()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for closed.Load() < established {
		select {
		case <-ctx.Done():
			return time.Since(start)
		case <-bound.C:
			log.Warn("the server did not close every connection after SIGTERM", "open", established-closed.Load(), "bound", shutdownBound(o))
			return time.Since(start)
		case <-tick.C:
		}
	}
	d := time.Since(start)
	log.Info("the server closed every connection after SIGTERM", "conns", established, "took", d)
	return d
}

// idleReader waits on an idle connection for the server's FIN, or for ours
// to be answered, and closes the connection.
func idleReader(c *net.TCPConn, t *tally, ourClose *atomic.Bool, timeout time.Duration) {
	defer c.Close()
	var b [64]byte
	n, err := c.Read(b[:])
	switch {
	case n > 0:
		t.mismatch(fmt.Sprintf("%d unexpected bytes on an idle connection", n))
	case err == io.EOF && ourClose.Load():
		// The answer to our FIN.
	case err == io.EOF:
		// The server closed first (a shutdown): answer with our FIN.
		t.eofs.Add(1)
		c.SetDeadline(time.Now().Add(timeout))
		c.CloseWrite()
	default:
		t.fail(err)
	}
}
