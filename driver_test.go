package sockfsm

// Tests of the driver loop against a scripted transport: the interleavings
// of requests from other goroutines with the loop's own calls.

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// scripted is a transport whose reads a test scripts. When the script is
// exhausted, reads return the peer's FIN.
type scripted struct {
	t        *testing.T
	reads    []scriptedRead
	written  bytes.Buffer
	onSetRDL func(time.Time)
	onRead   func()
	fin      bool
	closes   int
}

type scriptedRead struct {
	data string
	err  error
}

func (s *scripted) Read(p []byte) (int, error) {
	if s.onRead != nil {
		s.onRead()
	}
	if len(s.reads) == 0 {
		return 0, io.EOF
	}
	r := s.reads[0]
	s.reads = s.reads[1:]
	return copy(p, r.data), r.err
}

func (s *scripted) Write(p []byte) (int, error) {
	if s.fin {
		s.t.Errorf("write after CloseWrite: %q", p)
	}
	return s.written.Write(p)
}

func (s *scripted) CloseWrite() error { s.fin = true; return nil }
func (s *scripted) Close() error      { s.closes++; return nil }
func (s *scripted) Abort() error      { s.closes++; return nil }
func (s *scripted) SetReadDeadline(t time.Time) error {
	if s.onSetRDL != nil {
		s.onSetRDL(t)
	}
	return nil
}
func (s *scripted) SetWriteDeadline(time.Time) error { return nil }
func (s *scripted) LocalAddr() net.Addr              { return nil }
func (s *scripted) RemoteAddr() net.Addr             { return nil }

func newScriptedDriver(tr *scripted, cfg Config) *driver {
	d := &driver{}
	d.init(tr, cfg.limits(), Echo, ConnInfo{ID: 1}, &cfg, nil, time.Now)
	return d
}

var hourCfg = Config{IdleTimeout: time.Hour, LingerTimeout: time.Hour, LingerTime: time.Hour}

// TestDriverWakeRace: a shutdown requested after the loop set its read
// deadline but before it called Read (so the request's own wake-up, a past
// deadline, came before the loop's and was overwritten) must be seen before
// the loop blocks in Read.
func TestDriverWakeRace(t *testing.T) {
	tr := &scripted{t: t}
	d := newScriptedDriver(tr, hourCfg)
	tr.onSetRDL = func(dl time.Time) {
		if dl.After(time.Now()) && !d.shutdownReq.Load() {
			d.shutdownReq.Store(true) // from "another goroutine", between SetReadDeadline and Read
		}
	}
	blockedWithRequest := 0
	tr.onRead = func() {
		if d.pending() {
			blockedWithRequest++
		}
	}
	d.run()
	info := d.result
	if blockedWithRequest != 0 {
		t.Fatalf("Read called %d times with a request pending: the loop would block until the idle timeout", blockedWithRequest)
	}
	if info.Reason != ReasonShutdown || !tr.fin || tr.closes != 1 {
		t.Fatalf("info %+v fin=%v closes=%d", info, tr.fin, tr.closes)
	}
}

// TestDriverDataWithEOFDuringShutdown: a request that arrives together with
// EOF (as TLS returns it when close_notify follows the data) while a
// shutdown is being requested still gets its answer.
func TestDriverDataWithEOFDuringShutdown(t *testing.T) {
	tr := &scripted{t: t, reads: []scriptedRead{{"request", io.EOF}}}
	d := newScriptedDriver(tr, hourCfg)
	tr.onRead = func() { d.shutdownReq.Store(true) } // the request lands while Read returns
	d.run()
	info := d.result
	if got := tr.written.String(); got != "request" {
		t.Fatalf("the peer got %q, want the answer %q (info %+v)", got, "request", info)
	}
	if info.Aborted() || !tr.fin || tr.closes != 1 {
		t.Fatalf("info %+v fin=%v closes=%d", info, tr.fin, tr.closes)
	}
}
