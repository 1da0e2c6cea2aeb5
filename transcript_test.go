package sockfsm_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
)

// TestTranscripts drives an Engine by hand, on a virtual clock, through the
// scenarios in testdata/transcripts, in the manner of etcd raft's
// interaction tests: each file is one scenario (one row of the README's
// failure-modes table, the tutorial's happy path, or a request made from
// another goroutine), and each command's output is everything the engine
// did in response. Rewrite the expected output with
//
//	go test -run TestTranscripts . -rewrite
//
// and then read the diff: every expected line was checked against the
// documented semantics (README's "Failure modes", docs/failure-modes.md,
// docs/state-diagram.md) when it was written.
//
// The commands. Durations are Go durations (10s, 1.5s) or "off"; byte
// counts are integers or "off". A string S with spaces is written
// data=(this is a test). Times are printed relative to t0, the time of the
// `new` command, as +10s.
//
// Setting up:
//
//	new [idle=D] [write=D] [linger-timeout=D] [linger-time=D] [linger-bytes=N]
//	    [max-lifetime=D] [min-rate=N] [min-rate-window=D] [max-output=N]
//	    [handler=KIND] [greet=TEXT]
//	    A new Engine in Accepted, with the waker and Config.OnStateChange
//	    hooked, the clock at t0. A setting left out is the Config default.
//	    KIND is what OnData does with p:
//	      echo        Write(p) (sockfsm.Echo, with Write's error printed)
//	      silent      nothing
//	      panic       Write(p), then panic("boom")
//	      closer      Write(p), then Close()
//	      pauser      Write(p), then PauseRead()
//	    greet=TEXT makes OnOpen Write(TEXT).
//
// The driver's side (the steps and polls of the Engine):
//
//	start                       Start(now)
//	tick D                      advance the clock by D
//	timeout                     HandleTimeout(now)
//	next                        Next(now); prints the Action:
//	                            op, data, deadline (none if zero)
//	read [data=S] [n=N] [eof|reset|error|timeout]
//	                            ReadDone(now, p, result, err): p is S, or N
//	                            bytes of 'x'; the result is ok unless named
//	                            (reset: syscall.ECONNRESET, error: syscall.EIO)
//	write [n=N] [result=ok|timeout|reset|error]
//	                            WriteDone(now, n, result, err); n defaults to
//	                            the length of the last write Action's Data
//	closewrite [result=ok|reset|error]
//	                            CloseWriteDone(now, result, err)
//	closed                      CloseDone(now)
//	close                       Engine.Close() (the owner's graceful close)
//	abort [err=shutdown-deadline|handshake|other]
//	                            Engine.Abort(err), from the owner; the
//	                            default is ErrShutdownDeadline
//	pending                     Pending()
//
// The handler's side, from another goroutine (outside any callback; the
// command waits for the call to return):
//
//	conn-write data=S | n=N     Conn.Write
//	conn-close                  Conn.Close
//	conn-closewrite             Conn.CloseWrite
//	conn-abort                  Conn.Abort(errors.New("gone"))
//	conn-do data=S [panic]      Conn.Do(f): f prints "do", writes S (and
//	                            then panics)
//	pause                       Conn.PauseRead
//	resume                      Conn.ResumeRead
//
// Inspecting:
//
//	state                       State, Timeout, Pending, PeerClosed,
//	                            Buffered, Available
//	info                        CloseInfo, in full
//
// Output, in the order it happened: every transition Config.OnStateChange
// reports (from -event-> to); every handler callback (open, data "…",
// peer-close, drain, close reason=… linger=… read=N written=M); what a
// Write inside a callback returned when it was not everything; "wake" for
// each call of the waker; "log LEVEL msg" for each record logged at Info
// or above; "returned …" for a request's result. A command with nothing
// to print prints "ok".
func TestTranscripts(t *testing.T) {
	datadriven.Walk(t, "testdata/transcripts", func(t *testing.T, path string) {
		tr := &transcript{t: t}
		datadriven.RunTest(t, path, tr.run)
	})
}

// trT0 is the virtual clock's origin.
var trT0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

type transcript struct {
	t   *testing.T
	e   *sockfsm.Engine
	now time.Time
	act sockfsm.Action // the last Action Next returned

	mu  sync.Mutex // guards out: the waker runs on the requesting goroutine
	out []string
}

func (tr *transcript) printf(format string, args ...any) {
	tr.mu.Lock()
	tr.out = append(tr.out, fmt.Sprintf(format, args...))
	tr.mu.Unlock()
}

// at prints t relative to t0.
func (tr *transcript) at(t time.Time) string {
	if t.IsZero() {
		return "none"
	}
	d := t.Sub(trT0)
	if d < 0 {
		return d.String()
	}
	return "+" + d.String()
}

// trQuote prints a chunk of bytes: short ones whole, long ones by length.
func trQuote(p []byte) string {
	if len(p) <= 16 {
		return strconv.Quote(string(p))
	}
	return fmt.Sprintf("len=%d %s...", len(p), strconv.Quote(string(p[:8])))
}

// trSentinels are the errors info and returned name.
var trSentinels = []struct {
	name string
	err  error
}{
	{"ErrShutdown", sockfsm.ErrShutdown},
	{"ErrOutputFull", sockfsm.ErrOutputFull},
	{"ErrClosed", sockfsm.ErrClosed},
	{"ErrPeerReset", sockfsm.ErrPeerReset},
	{"ErrWriteTimeout", sockfsm.ErrWriteTimeout},
	{"ErrAborted", sockfsm.ErrAborted},
	{"ErrHandlerPanic", sockfsm.ErrHandlerPanic},
	{"ErrShutdownDeadline", sockfsm.ErrShutdownDeadline},
	{"ErrHandshake", sockfsm.ErrHandshake},
	{"ErrIO", sockfsm.ErrIO},
	{"ECONNRESET", syscall.ECONNRESET},
	{"EIO", syscall.EIO},
}

// trErr names the sentinels err matches, or prints its text if none.
func trErr(err error) string {
	if err == nil {
		return "nil"
	}
	var names []string
	for _, s := range trSentinels {
		if errors.Is(err, s.err) {
			names = append(names, s.name)
		}
	}
	if len(names) == 0 {
		return strconv.Quote(err.Error())
	}
	s := strings.Join(names, "+")
	var pe *sockfsm.PanicError
	if errors.As(err, &pe) {
		s += fmt.Sprintf("(value=%v stack=%t)", pe.Value, len(pe.Stack) > 0)
	}
	return s
}

func (tr *transcript) run(t *testing.T, d *datadriven.TestData) string {
	tr.mu.Lock()
	tr.out = nil
	tr.mu.Unlock()
	if d.Cmd != "new" && tr.e == nil {
		d.Fatalf(t, "%s before new", d.Cmd)
	}
	switch d.Cmd {
	case "new":
		tr.newEngine(t, d)
	case "start":
		tr.e.Start(tr.now)
	case "tick":
		if len(d.CmdArgs) != 1 {
			d.Fatalf(t, "tick D")
		}
		dur, err := time.ParseDuration(d.CmdArgs[0].Key)
		if err != nil {
			d.Fatalf(t, "tick: %v", err)
		}
		tr.now = tr.now.Add(dur)
		tr.printf("now=%s", tr.at(tr.now))
	case "timeout":
		tr.e.HandleTimeout(tr.now)
	case "next":
		a := tr.e.Next(tr.now)
		tr.act = a
		s := a.Op.String()
		if a.Op == sockfsm.OpWrite {
			s += " " + trQuote(a.Data)
		}
		switch a.Op {
		case sockfsm.OpRead, sockfsm.OpWait, sockfsm.OpWrite:
			s += " deadline=" + tr.at(a.Deadline)
		}
		tr.printf("%s", s)
	case "read":
		tr.read(t, d)
	case "write":
		n := 0
		if tr.act.Op == sockfsm.OpWrite {
			n = len(tr.act.Data)
		}
		d.MaybeScanArgs(t, "n", &n)
		r, err := trResult(t, d)
		tr.e.WriteDone(tr.now, n, r, err)
	case "closewrite":
		r, err := trResult(t, d)
		tr.e.CloseWriteDone(tr.now, r, err)
	case "closed":
		tr.e.CloseDone(tr.now)
	case "close":
		tr.returned(0, tr.e.Close(), false)
	case "abort":
		name := "shutdown-deadline"
		d.MaybeScanArgs(t, "err", &name)
		var err error
		switch name {
		case "shutdown-deadline":
			err = sockfsm.ErrShutdownDeadline
		case "handshake":
			err = errors.Join(sockfsm.ErrHandshake, errors.New("bad certificate"))
		case "other":
			err = errors.New("other")
		default:
			d.Fatalf(t, "abort: unknown err %q", name)
		}
		tr.e.Abort(err)
	case "pending":
		tr.printf("pending=%t", tr.e.Pending())
	case "conn-write":
		p := tr.payload(t, d)
		tr.outside(func(c *sockfsm.Conn) {
			n, err := c.Write(p)
			tr.returned(n, err, true)
		})
	case "conn-close":
		tr.outside(func(c *sockfsm.Conn) { tr.returned(0, c.Close(), false) })
	case "conn-closewrite":
		tr.outside(func(c *sockfsm.Conn) { tr.returned(0, c.CloseWrite(), false) })
	case "conn-abort":
		tr.outside(func(c *sockfsm.Conn) { c.Abort(errors.New("gone")) })
	case "conn-do":
		p := tr.payload(t, d)
		panics := d.HasArg("panic")
		tr.outside(func(c *sockfsm.Conn) {
			err := c.Do(func(c *sockfsm.Conn) {
				tr.printf("do %s", trQuote(p))
				if n, err := c.Write(p); err != nil {
					tr.printf("  write n=%d err=%s", n, trErr(err))
				}
				if panics {
					panic("boom")
				}
			})
			tr.returned(0, err, false)
		})
	case "pause":
		tr.outside(func(c *sockfsm.Conn) { c.PauseRead() })
	case "resume":
		tr.outside(func(c *sockfsm.Conn) { c.ResumeRead() })
	case "state":
		c := tr.e.Conn()
		tr.printf("state=%s timeout=%s pending=%t peer-closed=%t buffered=%d available=%d",
			tr.e.State(), tr.at(tr.e.Timeout()), tr.e.Pending(), c.PeerClosed(), c.Buffered(), c.Available())
	case "info":
		i := tr.e.CloseInfo()
		tr.printf("reason=%s aborted=%t err=%s", i.Reason, i.Aborted(), trErr(i.Err))
		tr.printf("linger=%s peer-fin=%t", i.Linger, i.PeerFIN)
		tr.printf("read=%d written=%d discarded=%d duration=%s", i.BytesRead, i.BytesWritten, i.Discarded, i.Duration)
	default:
		d.Fatalf(t, "unknown command %q", d.Cmd)
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.out) == 0 {
		return "ok\n"
	}
	return strings.Join(tr.out, "\n") + "\n"
}

// returned prints a request's result.
func (tr *transcript) returned(n int, err error, withN bool) {
	switch {
	case withN:
		tr.printf("returned n=%d err=%s", n, trErr(err))
	case err != nil:
		tr.printf("returned err=%s", trErr(err))
	default:
		tr.printf("returned ok")
	}
}

// outside calls f with the Conn from another goroutine, outside any
// callback, and waits for it to return.
func (tr *transcript) outside(f func(c *sockfsm.Conn)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(tr.e.Conn())
	}()
	<-done
}

// payload returns data=S, or n=N bytes of 'x'.
func (tr *transcript) payload(t *testing.T, d *datadriven.TestData) []byte {
	var s string
	if d.MaybeScanArgs(t, "data", &s) {
		return []byte(s)
	}
	var n int
	if d.MaybeScanArgs(t, "n", &n) {
		return []byte(strings.Repeat("x", n))
	}
	return nil
}

func (tr *transcript) read(t *testing.T, d *datadriven.TestData) {
	p := tr.payload(t, d)
	r, err := sockfsm.ResultOK, error(nil)
	for _, a := range d.CmdArgs {
		switch a.Key {
		case "data", "n":
		case "eof":
			r = sockfsm.ResultEOF
		case "timeout":
			r = sockfsm.ResultTimeout
		case "reset":
			r, err = sockfsm.ResultReset, syscall.ECONNRESET
		case "error":
			r, err = sockfsm.ResultError, syscall.EIO
		default:
			d.Fatalf(t, "read: unknown argument %q", a.Key)
		}
	}
	tr.e.ReadDone(tr.now, p, r, err)
}

// trResult parses result=ok|timeout|reset|error.
func trResult(t *testing.T, d *datadriven.TestData) (sockfsm.Result, error) {
	s := "ok"
	d.MaybeScanArgs(t, "result", &s)
	switch s {
	case "ok":
		return sockfsm.ResultOK, nil
	case "timeout":
		return sockfsm.ResultTimeout, nil
	case "reset":
		return sockfsm.ResultReset, syscall.ECONNRESET
	case "error":
		return sockfsm.ResultError, syscall.EIO
	}
	d.Fatalf(t, "unknown result %q", s)
	return 0, nil
}

// trDuration parses a duration setting: a Go duration, or "off" (negative).
func trDuration(t *testing.T, d *datadriven.TestData, key string) time.Duration {
	var s string
	if !d.MaybeScanArgs(t, key, &s) {
		return 0
	}
	if s == "off" {
		return -1
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		d.Fatalf(t, "%s: %v", key, err)
	}
	return v
}

// trCount parses a byte count setting: an integer, or "off" (negative).
func trCount(t *testing.T, d *datadriven.TestData, key string) int {
	var s string
	if !d.MaybeScanArgs(t, key, &s) {
		return 0
	}
	if s == "off" {
		return -1
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		d.Fatalf(t, "%s: %v", key, err)
	}
	return v
}

func (tr *transcript) newEngine(t *testing.T, d *datadriven.TestData) {
	for _, a := range d.CmdArgs {
		switch a.Key {
		case "idle", "write", "linger-timeout", "linger-time", "linger-bytes", "max-lifetime", "min-rate", "min-rate-window", "max-output", "handler", "greet":
		default:
			d.Fatalf(t, "new: unknown setting %q", a.Key)
		}
	}
	cfg := sockfsm.Config{
		IdleTimeout:      trDuration(t, d, "idle"),
		WriteTimeout:     trDuration(t, d, "write"),
		LingerTimeout:    trDuration(t, d, "linger-timeout"),
		LingerTime:       trDuration(t, d, "linger-time"),
		LingerBytes:      int64(trCount(t, d, "linger-bytes")),
		MaxLifetime:      trDuration(t, d, "max-lifetime"),
		MinRate:          int64(trCount(t, d, "min-rate")),
		MinRateWindow:    trDuration(t, d, "min-rate-window"),
		MaxPendingOutput: trCount(t, d, "max-output"),
		OnStateChange: func(_ sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
			tr.printf("%s -%s-> %s", from, ev, to)
		},
		Logger: slog.New(trLogHandler{tr}),
	}
	h := &trHandler{tr: tr, kind: "echo"}
	d.MaybeScanArgs(t, "handler", &h.kind)
	switch h.kind {
	case "echo", "silent", "panic", "closer", "pauser":
	default:
		d.Fatalf(t, "new: unknown handler %q", h.kind)
	}
	d.MaybeScanArgs(t, "greet", &h.greet)
	e, err := sockfsm.NewEngine(cfg, h, sockfsm.ConnInfo{ID: 1})
	if err != nil {
		d.Fatalf(t, "NewEngine: %v", err)
	}
	e.SetWaker(func(op sockfsm.Op) { tr.printf("wake %s", op) })
	tr.e, tr.now, tr.act = e, trT0, sockfsm.Action{}
}

// trHandler prints every callback; OnData does what its kind says.
type trHandler struct {
	tr    *transcript
	kind  string
	greet string
}

// write writes p and prints Write's result if it did not take all of p.
func (h *trHandler) write(c *sockfsm.Conn, p []byte) {
	if n, err := c.Write(p); err != nil || n != len(p) {
		h.tr.printf("  write n=%d err=%s", n, trErr(err))
	}
}

func (h *trHandler) OnOpen(c *sockfsm.Conn) {
	h.tr.printf("open")
	if h.greet != "" {
		h.write(c, []byte(h.greet))
	}
}

func (h *trHandler) OnData(c *sockfsm.Conn, p []byte) {
	h.tr.printf("data %s", trQuote(p))
	switch h.kind {
	case "echo":
		h.write(c, p)
	case "silent":
	case "panic":
		h.write(c, p)
		panic("boom")
	case "closer":
		h.write(c, p)
		if err := c.Close(); err != nil {
			h.tr.printf("  close err=%s", trErr(err))
		}
	case "pauser":
		h.write(c, p)
		c.PauseRead()
	}
}

func (h *trHandler) OnPeerClose(*sockfsm.Conn) { h.tr.printf("peer-close") }

func (h *trHandler) OnDrain(*sockfsm.Conn) { h.tr.printf("drain") }

func (h *trHandler) OnClose(_ *sockfsm.Conn, i sockfsm.CloseInfo) {
	h.tr.printf("close reason=%s linger=%s read=%d written=%d", i.Reason, i.Linger, i.BytesRead, i.BytesWritten)
}

// trLogHandler prints the engine's log records at Info and above: the
// message and its attributes, sorted, with a stack reduced to whether it
// is there.
type trLogHandler struct{ tr *transcript }

func (h trLogHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

func (h trLogHandler) Handle(_ context.Context, r slog.Record) error {
	var attrs []string
	r.Attrs(func(a slog.Attr) bool {
		v := a.Value.String()
		switch {
		case a.Key == "stack":
			v = strconv.FormatBool(v != "")
		case a.Key == "err":
			if err, ok := a.Value.Any().(error); ok {
				v = trErr(err)
			}
		}
		attrs = append(attrs, a.Key+"="+v)
		return true
	})
	sort.Strings(attrs)
	h.tr.printf("log %s %q %s", r.Level, r.Message, strings.Join(attrs, " "))
	return nil
}

func (h trLogHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h trLogHandler) WithGroup(string) slog.Handler      { return h }
