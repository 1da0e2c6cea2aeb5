package metrics_test

import (
	"errors"
	"io"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/metrics"
)

// The engine's hot path with and without the metrics: a whole connection
// and a steady-state echo exchange driven through the public Engine API on
// a virtual clock, with no I/O, as a driver would.

var chunk = []byte("this is a test")

// echoExchange is one echo through e: ReadDone, Next (write), WriteDone,
// Next (read).
func echoExchange(e *sockfsm.Engine, now time.Time) error {
	e.ReadDone(now, chunk, sockfsm.ResultOK, nil)
	a := e.Next(now)
	if a.Op != sockfsm.OpWrite {
		return errors.New("no write: " + a.Op.String())
	}
	e.WriteDone(now, len(a.Data), sockfsm.ResultOK, nil)
	if a := e.Next(now); a.Op != sockfsm.OpRead {
		return errors.New("no read after the write: " + a.Op.String())
	}
	return nil
}

// connection runs one tutorial connection through a new engine with cfg.
func connection(cfg sockfsm.Config, now time.Time) error {
	e, err := sockfsm.NewEngine(cfg, sockfsm.Echo{}, sockfsm.ConnInfo{ID: 1})
	if err != nil {
		return err
	}
	e.Start(now)
	if a := e.Next(now); a.Op != sockfsm.OpRead {
		return errors.New("no first read")
	}
	if err := echoExchange(e, now); err != nil {
		return err
	}
	e.ReadDone(now, nil, sockfsm.ResultEOF, io.EOF)
	if a := e.Next(now); a.Op != sockfsm.OpCloseWrite {
		return errors.New("no half-close: " + a.Op.String())
	}
	e.CloseWriteDone(now, sockfsm.ResultOK, nil)
	if a := e.Next(now); a.Op != sockfsm.OpClose {
		return errors.New("no close: " + a.Op.String())
	}
	e.CloseDone(now)
	if info := e.CloseInfo(); info.Reason != sockfsm.ReasonPeerClosed {
		return errors.New("closed for " + info.Reason.String())
	}
	return nil
}

// configs returns a Config without metrics and one with them.
func configs() (plain, instrumented sockfsm.Config) {
	m := metrics.New(metrics.Opts{})
	m.Instrument(&instrumented)
	return plain, instrumented
}

// TestEngineAllocatesNothingMore: with the metrics, a whole connection
// through the engine allocates exactly what it does without them, and a
// steady-state echo exchange still allocates nothing. Allocation counts,
// not times.
func TestEngineAllocatesNothingMore(t *testing.T) {
	plain, instrumented := configs()
	now := time.Unix(1_700_000_000, 0)
	per := func(cfg sockfsm.Config) float64 {
		return testing.AllocsPerRun(200, func() {
			if err := connection(cfg, now); err != nil {
				t.Fatal(err)
			}
		})
	}
	if a, b := per(plain), per(instrumented); b != a {
		t.Errorf("a connection allocates %v times with the metrics, %v without", b, a)
	}

	e, err := sockfsm.NewEngine(instrumented, sockfsm.Echo{}, sockfsm.ConnInfo{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	e.Start(now)
	e.Next(now)
	if err := echoExchange(e, now); err != nil { // the output buffer is allocated once
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(1000, func() {
		now = now.Add(time.Millisecond)
		if err := echoExchange(e, now); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Errorf("an echo exchange with the metrics: %v allocs/op, want 0", a)
	}
}

// BenchmarkEngineConnection is a whole tutorial connection through the
// engine, without and with the metrics.
func BenchmarkEngineConnection(b *testing.B) {
	plain, instrumented := configs()
	now := time.Unix(1_700_000_000, 0)
	for _, c := range []struct {
		name string
		cfg  sockfsm.Config
	}{{"plain", plain}, {"metrics", instrumented}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := connection(c.cfg, now); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEngineEchoExchange is one steady-state echo exchange through
// the engine (four transitions), without and with the metrics.
func BenchmarkEngineEchoExchange(b *testing.B) {
	plain, instrumented := configs()
	for _, c := range []struct {
		name string
		cfg  sockfsm.Config
	}{{"plain", plain}, {"metrics", instrumented}} {
		b.Run(c.name, func(b *testing.B) {
			now := time.Unix(1_700_000_000, 0)
			e, err := sockfsm.NewEngine(c.cfg, sockfsm.Echo{}, sockfsm.ConnInfo{ID: 1})
			if err != nil {
				b.Fatal(err)
			}
			e.Start(now)
			e.Next(now)
			b.ReportAllocs()
			for b.Loop() {
				now = now.Add(time.Millisecond)
				if err := echoExchange(e, now); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
