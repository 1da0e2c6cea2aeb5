package sockfsm

import (
	"net"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/fsm"
)

// TestListenerZeroConfigHasNoIdleTimer: with a zero Config, a connection
// of the net.Conn face has no engine timer while the application computes,
// before it has answered and after the peer's FIN: a net/http handler that
// computes for minutes still answers. The engine is the one Listener.Accept
// builds (NetConn as the handler, the Listener's Config), driven by hand on
// a virtual clock.
func TestListenerZeroConfigHasNoIdleTimer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(ln, Config{})
	defer l.Close()
	if got := l.srv.Config.limits().idle; got != 0 {
		t.Fatalf("the Listener's IdleTimeout is %v; want off", got)
	}
	if got := l.srv.Config.limits().rateWindow; got != 0 {
		t.Fatalf("the Listener's MinRate window is %v; want MinRate off", got)
	}
	nc := newNetConn(ConnInfo{ID: 1}, l.lim.readBuf)
	e, err := NewEngine(l.srv.Config, nc, ConnInfo{ID: 1})
	if err != nil {
		t.Fatal(err)
	}
	nc.c = e.Conn()
	e.Start(t0)
	// The request arrives; the application computes for two hours.
	e.ReadDone(t0, []byte("GET / HTTP/1.1\r\n\r\n"), ResultOK, nil)
	later := t0.Add(2 * time.Hour)
	e.HandleTimeout(later)
	if a := e.Next(later); a.Op != OpRead || !a.Deadline.IsZero() {
		t.Fatalf("while the application computes: %v with deadline %v; want a read with none", a.Op, a.Deadline)
	}
	// The peer half-closes; the connection is held, with no timer.
	e.ReadDone(later, nil, ResultEOF, nil)
	much := later.Add(2 * time.Hour)
	e.HandleTimeout(much)
	if a := e.Next(much); a.Op != OpWait || !a.Deadline.IsZero() || e.State() != fsm.Receiving {
		t.Fatalf("after the peer's FIN: %v with deadline %v in %s; want a wait with none in receiving", a.Op, a.Deadline, e.State())
	}
	// The application answers and closes (its Write queues through the
	// Conn, as NetConn.Write does before it waits for the flush): the
	// answer is flushed, our FIN sent, and the connection closes at once,
	// the peer's FIN having been seen.
	resp := []byte("HTTP/1.1 200 OK\r\n\r\n")
	if _, err := nc.c.Write(resp); err != nil {
		t.Fatal(err)
	}
	if err := nc.Close(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []Op{OpWrite, OpCloseWrite, OpClose} {
		e.HandleTimeout(much)
		a := e.Next(much)
		if a.Op != want {
			t.Fatalf("next %v, want %v (state %s)", a.Op, want, e.State())
		}
		switch a.Op {
		case OpWrite:
			e.WriteDone(much, len(a.Data), ResultOK, nil)
		case OpCloseWrite:
			e.CloseWriteDone(much, ResultOK, nil)
		case OpClose:
			e.CloseDone(much)
		}
	}
	info, ok := nc.CloseInfo()
	if !ok || info.Aborted() || info.Reason != ReasonHandlerClose || info.BytesWritten != int64(len(resp)) {
		t.Fatalf("CloseInfo %+v (ended %v)", info, ok)
	}
}

// TestListenerMinRateWhenSet: the net.Conn face leaves MinRate off unless
// it is set; set, it closes a peer that trickles, as on Server. The same
// request as TestListenerZeroConfigHasNoIdleTimer, with the application
// computing past the window: off, nothing happens; on, the connection
// half-closes with ReasonMinRate.
func TestListenerMinRateWhenSet(t *testing.T) {
	for _, rate := range []int64{0, 100} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l := NewListener(ln, Config{MinRate: rate, MinRateWindow: time.Second})
		nc := newNetConn(ConnInfo{ID: 1}, l.lim.readBuf)
		e, err := NewEngine(l.srv.Config, nc, ConnInfo{ID: 1})
		if err != nil {
			t.Fatal(err)
		}
		nc.c = e.Conn()
		e.Start(t0)
		e.ReadDone(t0, []byte("GET / HTTP/1.1\r\n\r\n"), ResultOK, nil)
		later := t0.Add(time.Minute)
		e.HandleTimeout(later)
		a := e.Next(later)
		switch {
		case rate == 0 && (a.Op != OpRead || e.State() != fsm.Receiving):
			t.Errorf("MinRate unset: %v in %s after a minute; want a read in receiving", a.Op, e.State())
		case rate > 0 && (a.Op != OpCloseWrite || e.CloseInfo().Reason != ReasonMinRate):
			t.Errorf("MinRate %d: %v, reason %s; want our FIN for min-rate", rate, a.Op, e.CloseInfo().Reason)
		}
		l.Close()
	}
}
