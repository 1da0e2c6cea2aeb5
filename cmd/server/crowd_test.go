package main

// The slowloris crowd: hundreds of connections that trickle a byte at a
// time from several addresses, and a flood of connections from one
// address, against the server as its flags configure it, while honest
// clients keep getting their echo.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/metrics"
)

// dialFrom connects to addr from the loopback address src.
func dialFrom(src, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: deadline}
	return d.Dial("tcp", addr)
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd: ", err)
	}
	return len(ents)
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// refusalCounter is the server's OnRefuse: it counts refusals by reason
// and by address, as a metrics exporter would.
type refusalCounter struct {
	mu       sync.Mutex
	byReason map[string]int
	byAddr   map[string]int
}

func (r *refusalCounter) hook(remote net.Addr, reason error) {
	name := sockfsm.RefusalReason(reason)
	host, _, _ := net.SplitHostPort(remote.String())
	r.mu.Lock()
	defer r.mu.Unlock()
	r.byReason[name]++
	r.byAddr[host]++
}

func (r *refusalCounter) addr(a string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byAddr[a]
}

func TestSlowlorisCrowd(t *testing.T) {
	if testing.Short() {
		t.Skip("opens about 1,300 connections")
	}
	const (
		crowdAddrs   = 6   // 127.0.0.10 ...
		perCrowdAddr = 50  // tricklers from each: 300 in all
		perIP        = 20  // -max-conns-per-ip
		maxConns     = 200 // -max-conns
		floodAddr    = "127.0.0.50"
		flood        = 1000 // connections from floodAddr, all held open
		honest       = 8    // clients from 127.0.0.100 ..., one address each
		honestFor    = 2 * time.Second
		exchangeMax  = 5 * time.Second // safety bound on one honest exchange
	)
	// Each address keeps at most perIP; the honest clients one each.
	const maxServed = crowdAddrs*perIP + perIP + honest

	var logs syncBuffer
	o, err := parse([]string{"-addr", "127.0.0.1:0", "-max-conns", fmt.Sprint(maxConns),
		"-max-conns-per-ip", fmt.Sprint(perIP), "-log-level", "warn"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	srv := newServer(o, io.Discard, &logs)
	refused := &refusalCounter{byReason: map[string]int{}, byAddr: map[string]int{}}
	srv.Config.OnRefuse = refused.hook
	// The metrics an operator would graph, through the same hooks.
	m := metrics.New(metrics.Opts{})
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	m.Instrument(&srv.Config)
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	baseFDs, baseHeap := openFDs(t), heapInUse()
	var clients []net.Conn // every client socket still open, closed at the end
	defer func() {
		for _, c := range clients {
			c.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()

	// The crowd: connections that trickle a byte every 100ms and never
	// finish. Those beyond perIP are refused and closed by the server; a
	// write to them soon fails and the trickler drops them.
	var tricklers []net.Conn
	for i := range crowdAddrs {
		src := fmt.Sprintf("127.0.0.%d", 10+i)
		for range perCrowdAddr {
			c, err := dialFrom(src, addr)
			if err != nil {
				t.Fatalf("crowd dial from %s: %v", src, err)
			}
			tricklers = append(tricklers, c)
			clients = append(clients, c)
		}
	}
	stopTrickle := make(chan struct{})
	trickled := make(chan int)
	go func() {
		live := append([]net.Conn(nil), tricklers...)
		for {
			select {
			case <-stopTrickle:
				trickled <- len(live)
				return
			case <-time.After(100 * time.Millisecond):
			}
			kept := live[:0]
			for _, c := range live {
				c.SetWriteDeadline(time.Now().Add(time.Second))
				if _, err := c.Write([]byte{'.'}); err == nil {
					kept = append(kept, c)
				} else {
					c.Close()
				}
			}
			live = kept
		}
	}()

	// Honest clients, from start to finish of the attack: every echo exact,
	// every exchange within exchangeMax.
	var honestDone atomic.Int64
	honestErrs := make(chan error, honest)
	stopHonest := time.Now().Add(honestFor)
	var wg sync.WaitGroup
	for i := range honest {
		wg.Go(func() {
			src := fmt.Sprintf("127.0.0.%d", 100+i)
			for round := 0; time.Now().Before(stopHonest); round++ {
				msg := message(i, round, 100)
				got, err := honestExchange(src, addr, msg, exchangeMax)
				if err != nil || !bytes.Equal(got, msg) {
					honestErrs <- fmt.Errorf("honest client %s round %d: echo %q, %v; want %q", src, round, got, err, msg)
					return
				}
				honestDone.Add(1)
				time.Sleep(10 * time.Millisecond) // an honest pace, on a shared machine
			}
			honestErrs <- nil
		})
	}

	// The flood, from one address, every connection held open.
	floodConns := make([]net.Conn, flood)
	var fwg sync.WaitGroup
	var floodErr atomic.Value
	for g := range 8 {
		fwg.Go(func() {
			for k := g; k < flood; k += 8 {
				c, err := dialFrom(floodAddr, addr)
				if err != nil {
					floodErr.Store(err)
					return
				}
				floodConns[k] = c
			}
		})
	}
	fwg.Wait()
	if err, _ := floodErr.Load().(error); err != nil {
		t.Fatalf("flood dial: %v", err)
	}
	// The server refuses all but perIP of them.
	end := time.Now().Add(deadline)
	for refused.addr(floodAddr) < flood-perIP && time.Now().Before(end) {
		time.Sleep(5 * time.Millisecond)
	}
	// The client learns which ones by reading: EOF at once for a refused
	// one, nothing (a deadline) for one the server holds.
	var held atomic.Int64
	var rwg sync.WaitGroup
	for k, c := range floodConns {
		rwg.Go(func() {
			c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			_, err := c.Read(make([]byte, 1))
			if errors.Is(err, os.ErrDeadlineExceeded) {
				held.Add(1)
				return
			}
			c.Close() // refused: the attacker's socket is gone too
			floodConns[k] = nil
		})
	}
	rwg.Wait()
	for _, c := range floodConns {
		if c != nil {
			clients = append(clients, c)
		}
	}

	// Steady state under attack: what the server holds is bounded.
	numConns, fds, heap := srv.NumConns(), openFDs(t), heapInUse()
	wg.Wait()
	close(stopTrickle)
	liveTricklers := <-trickled
	close(honestErrs)
	for err := range honestErrs {
		if err != nil {
			t.Error(err)
		}
	}

	t.Logf("under attack: %d connections served (bound %d), %d fds over the baseline (the clients keep %d tricklers, %d of the flood, up to %d honest), heap %+.1f MiB; %d honest exchanges; %d tricklers alive; flood: %d of %d held",
		numConns, maxServed, fds-baseFDs, liveTricklers, held.Load(), honest, float64(int64(heap)-int64(baseHeap))/(1<<20),
		honestDone.Load(), liveTricklers, held.Load(), flood)

	if honestDone.Load() < honest {
		t.Errorf("only %d honest exchanges completed", honestDone.Load())
	}
	if numConns > maxServed {
		t.Errorf("the server holds %d connections, more than the %d the per-address limit allows", numConns, maxServed)
	}
	if got := held.Load(); got != perIP {
		t.Errorf("the server holds %d of the flood's connections, want -max-conns-per-ip = %d", got, perIP)
	}
	if liveTricklers != crowdAddrs*perIP {
		t.Errorf("%d tricklers still connected, want %d (perIP from each address)", liveTricklers, crowdAddrs*perIP)
	}
	// Client and server sockets of this process: the server's are bounded by
	// maxServed, and the clients keep only what the server keeps (the honest
	// ones' a moment longer); 1,300 were opened.
	if limit := baseFDs + 2*maxServed + 2*honest; fds > limit {
		t.Errorf("%d fds open under attack, more than %d", fds, limit)
	}
	if grown := int64(heap) - int64(baseHeap); grown > 64<<20 {
		t.Errorf("the heap grew by %d MiB under attack", grown>>20)
	}

	// What was refused and why: the flood's excess and each crowd address's
	// excess, all by the per-address limit; no honest client.
	refused.mu.Lock()
	defer refused.mu.Unlock()
	wantTotal := (flood - perIP) + crowdAddrs*(perCrowdAddr-perIP)
	if got := refused.byReason["too-many-conns-from-ip"]; got != wantTotal || len(refused.byReason) != 1 {
		t.Errorf("refusals by reason %v, want only too-many-conns-from-ip = %d", refused.byReason, wantTotal)
	}
	for i := range crowdAddrs {
		a := fmt.Sprintf("127.0.0.%d", 10+i)
		if got := refused.byAddr[a]; got != perCrowdAddr-perIP {
			t.Errorf("%d refusals for %s, want %d", got, a, perCrowdAddr-perIP)
		}
	}
	if got := refused.byAddr[floodAddr]; got != flood-perIP {
		t.Errorf("%d refusals for the flood, want %d", got, flood-perIP)
	}
	if n := strings.Count(logs.String(), "connection refused"); n != wantTotal {
		t.Errorf("%d refusals logged, want one each, %d", n, wantTotal)
	}
	// The metrics show the same: refused_total by reason.
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "sockfsm_refused_total" {
			continue
		}
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == "reason" {
					got[l.GetValue()] = s.GetCounter().GetValue()
				}
			}
		}
	}
	if got["too-many-conns-from-ip"] != float64(wantTotal) || got["proxy-header"] != 0 {
		t.Errorf("sockfsm_refused_total by reason %v, want too-many-conns-from-ip = %d and no other", got, wantTotal)
	}
}

// honestExchange is the tutorial's client from src, bounded by max.
func honestExchange(src, addr string, msg []byte, max time.Duration) ([]byte, error) {
	c, err := dialFrom(src, addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(max))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}
