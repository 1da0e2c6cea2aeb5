//go:build linux

package main

// Tests of the real server process under its supervisors: systemd's socket
// activation (a descriptor inherited as systemd passes it, and
// systemd-socket-activate itself) and zero-downtime restarts (-upgrade)
// under load, with -pid-file and systemd's notifications.
//
// A restarted process is the child of the process it replaces, which
// exits: the test process makes itself the child subreaper (Linux), so
// that it inherits the orphans and can wait for each one and read its exit
// status. Hence these tests are Linux's; tableflip works on macOS too.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm/internal/testutil"
)

// becomeSubreaper makes this process the child subreaper: the children of
// its children that exit become its own, for waitPID.
var becomeSubreaper = sync.OnceValue(func() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return errno
	}
	return nil
})

// waitPID waits for the process pid, a child of this one (one inherited
// as subreaper, or one os/exec did not start), and returns its exit
// status.
func waitPID(t *testing.T, pid int) syscall.WaitStatus {
	t.Helper()
	type result struct {
		ws  syscall.WaitStatus
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var ws syscall.WaitStatus
		_, err := syscall.Wait4(pid, &ws, 0, nil)
		for errors.Is(err, syscall.EINTR) {
			_, err = syscall.Wait4(pid, &ws, 0, nil)
		}
		ch <- result{ws, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("waiting for process %d: %v", pid, r.err)
		}
		return r.ws
	case <-time.After(deadline):
		syscall.Kill(pid, syscall.SIGKILL)
		r := <-ch
		t.Fatalf("process %d did not exit (killed: %v)", pid, r.ws)
		return r.ws
	}
}

// serverLog is the log file the server processes share: every generation
// of a restart writes to the stderr it inherited.
type serverLog struct {
	t    *testing.T
	path string
}

func newServerLog(t *testing.T, dir string) (*serverLog, *os.File) {
	l := &serverLog{t: t, path: filepath.Join(dir, "server.log")}
	f, err := os.Create(l.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", l.String())
		}
	})
	return l, f
}

func (l *serverLog) String() string {
	b, _ := os.ReadFile(l.path)
	return string(b)
}

// waitFor polls until cond holds, within deadline, and fails the test
// with what otherwise.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(deadline); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// listeningAddr waits for the n-th "listening" line of the log and returns
// its address.
func (l *serverLog) listeningAddr(n int) string {
	l.t.Helper()
	re := regexp.MustCompile(`msg=listening addr=(\S+)`)
	var addr string
	waitFor(l.t, fmt.Sprintf("listening line %d in the server log", n), func() bool {
		m := re.FindAllStringSubmatch(l.String(), -1)
		if len(m) >= n {
			addr = m[n-1][1]
			return true
		}
		return false
	})
	return addr
}

// readPID returns the pid the pid file names, or 0.
func readPID(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// inheritedListener returns a listening TCP socket on 127.0.0.1, as a file
// to pass to a process, and its address.
func inheritedListener(t *testing.T) (*os.File, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, ln.Addr().String()
}

// systemdCommand is bin run as systemd runs a socket-activated service: the
// listening socket f is descriptor 3, LISTEN_FDS=1 and LISTEN_PID is the
// service's pid, which the shell that execs it knows as $$. -addr names a
// path that cannot be listened on, so that a server that ignored the
// passed socket would fail.
func systemdCommand(bin string, f *os.File, args ...string) *exec.Cmd {
	args = append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, bin, "-addr", "unix:/nonexistent/dir/sock"}, args...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=sockfsm-echo.socket")
	cmd.ExtraFiles = []*os.File{f}
	return cmd
}

// TestSystemdActivation: with a listening socket passed as systemd passes
// it, the server serves it instead of -addr, and says so; with -upgrade, a
// restart hands the passed socket on to the new process, which serves it
// (the name LISTEN_FDS is no longer set for it: tableflip's own hand-over
// carries the socket), and its parent exits 0.
func TestSystemdActivation(t *testing.T) {
	if err := becomeSubreaper(); err != nil {
		t.Skipf("cannot become the child subreaper: %v", err)
	}
	bin := buildServer(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "server.pid")
	f, addr := inheritedListener(t)
	log, logFile := newServerLog(t, dir)
	cmd := systemdCommand(bin, f, "-upgrade", "-pid-file", pidFile)
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pids := []int{cmd.Process.Pid}
	defer func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		cmd.Wait()
	}()

	if got := log.listeningAddr(1); got != addr {
		t.Fatalf("the server listens on %s, want the passed socket's %s", got, addr)
	}
	if !strings.Contains(log.String(), "socket activation") {
		t.Errorf("the log does not say the server serves the sockets systemd passed")
	}
	waitFor(t, "the pid file", func() bool { return readPID(pidFile) == cmd.Process.Pid })
	msg := "this is a test"
	if got, err := exchange(addr, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("exchange: %q, %v; want %q then EOF", got, err, msg)
	}

	syscall.Kill(cmd.Process.Pid, syscall.SIGHUP)
	waitFor(t, "a new pid in the pid file", func() bool {
		pid := readPID(pidFile)
		return pid != 0 && pid != cmd.Process.Pid
	})
	next := readPID(pidFile)
	pids = append(pids, next)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the process replaced by the restart exited: %v, want 0", err)
	}
	if got := log.listeningAddr(2); got != addr {
		t.Errorf("the restarted server listens on %s, want the passed socket's %s", got, addr)
	}
	if got, err := exchange(addr, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("exchange after the restart: %q, %v; want %q then EOF", got, err, msg)
	}
	syscall.Kill(next, syscall.SIGTERM)
	if ws := waitPID(t, next); ws.ExitStatus() != 0 {
		t.Errorf("the restarted server exited %v after SIGTERM, want 0", ws)
	}
	if _, err := os.Stat(pidFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the pid file is still there after the last process stopped: %v", err)
	}
}

// TestSystemdSocketActivate: systemd's own tool, systemd-socket-activate,
// listens and starts the server on the first connection, passing the
// socket; the server serves it and stops on SIGTERM with exit 0.
func TestSystemdSocketActivate(t *testing.T) {
	tool := testutil.Tool(t, "systemd-socket-activate", "systemd")
	bin := buildServer(t)
	// A free port, for the tool to listen on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	var story, logs syncBuffer
	cmd := exec.Command(tool, "-l", addr, bin, "-addr", "unix:/nonexistent/dir/sock", "-v")
	addrc, logsDone, exitc := startProcess(t, cmd, &story, &logs)
	exited := make(chan error, 1) // exitc's result, put back for the deferred wait
	go func() { err := <-exitc; exited <- err }()
	defer func() {
		select {
		case err := <-exited:
			exited <- err
		default:
			cmd.Process.Kill()
		}
		<-exited
		if t.Failed() {
			t.Logf("log:\n%s\nstory:\n%s", logs.String(), story.String())
		}
	}()
	waitFor(t, "the tool's listening socket", func() bool {
		return strings.Contains(logs.String(), "Listening on "+addr)
	})
	// The first connection starts the server.
	msg := "this is a test"
	if got, err := exchange(addr, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("exchange: %q, %v; want %q then EOF", got, err, msg)
	}
	select {
	case got := <-addrc:
		if got != addr {
			t.Errorf("the server listens on %s, want %s", got, addr)
		}
	case <-logsDone:
		t.Fatal("the server exited")
	case <-time.After(deadline):
		t.Fatal("the server did not log its address")
	}
	if !strings.Contains(logs.String(), "socket activation") {
		t.Errorf("the log does not say the server serves the sockets systemd passed")
	}
	if got, err := exchange(addr, []byte(msg)); err != nil || string(got) != msg {
		t.Errorf("second exchange: %q, %v; want %q then EOF", got, err, msg)
	}
	cmd.Process.Signal(syscall.SIGTERM) // the tool exec'd the server: same process
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Errorf("the server exited: %v, want 0", err)
		}
	case <-time.After(deadline):
		t.Fatal("the server did not exit after SIGTERM")
	}
	if !strings.Contains(story.String(), "Bytes received: 14") {
		t.Errorf("the story lacks the exchange:\n%s", story.String())
	}
}

// notifySocket listens where a server sends systemd's notifications and
// collects them, one string per datagram.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	done chan struct{}
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "sockfsm") // short: socket paths are
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{path: filepath.Join(dir, "notify"), done: make(chan struct{})}
	n.conn, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(n.done)
		buf := make([]byte, 4096)
		for {
			k, err := n.conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		n.conn.Close()
		<-n.done
		os.RemoveAll(dir)
	})
	return n
}

func (n *notifySocket) messages() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.msgs...)
}

// loadStats counts how the load's exchanges ended.
type loadStats struct {
	churned    atomic.Int64 // churn exchanges whose echo was complete and exact
	cut        atomic.Int64 // churn exchanges the draining server ended (FIN) after an exact prefix: failures
	rounds     atomic.Int64 // echo round trips, complete and exact
	reconnects atomic.Int64 // echo connections the draining server ended (FIN) after exact round trips
	refused    atomic.Int64
	resets     atomic.Int64
	mu         sync.Mutex
	problems   []string
}

func (s *loadStats) problem(format string, a ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.problems) < 20 {
		s.problems = append(s.problems, fmt.Sprintf(format, a...))
	}
}

// dialErr counts a failed dial.
func (s *loadStats) dialErr(who string, err error) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		s.refused.Add(1)
	case isReset(err):
		s.resets.Add(1)
	}
	s.problem("%s: dial: %v", who, err)
}

// churnLoad runs the tutorial's exchange in a loop (connect, send,
// half-close, read the echo to EOF, close) until stop is closed or
// maxRounds. Every exchange must be whole: one that the draining server
// ended early, after an exact prefix of its echo, is a failure.
func churnLoad(id int, addr string, stop <-chan struct{}, s *loadStats) {
	const maxRounds, maxMsg = 100000, 16 << 10
	for seq := range maxRounds {
		select {
		case <-stop:
			return
		default:
		}
		msg := message(id, seq, 1+(id*7919+seq*104729)%maxMsg)
		o, err := clientExchange(addr, msg)
		who := fmt.Sprintf("churn %d round %d", id, seq)
		switch {
		case err != nil:
			s.dialErr(who, err)
		case !o.exact:
			s.problem("%s: the echo is not an exact prefix of the message (%d of %d bytes)", who, o.got, o.sent)
		case o.err == nil && o.got == o.sent:
			s.churned.Add(1)
		case o.err == nil:
			// A new connection's request is served even when the old
			// process's Shutdown began as it was accepted (Engine.Close
			// waits FirstInputGrace for its first input).
			s.cut.Add(1)
			s.problem("%s: the draining server ended the echo after %d of %d bytes", who, o.got, o.sent)
		case isReset(o.err):
			s.resets.Add(1)
			s.problem("%s: reset after %d of %d bytes: %v", who, o.got, o.sent, o.err)
		default:
			s.problem("%s: %v after %d of %d bytes", who, o.err, o.got, o.sent)
		}
	}
}

// echoLoad keeps a connection open and runs round trips on it (send a
// message, read its echo) until stop is closed or maxRounds. When the
// draining server ends the connection (EOF, after an exact prefix of the
// round's echo), it connects again and runs the round again: the rounds
// whose echo came back in full are counted, and every byte of every echo
// is checked.
func echoLoad(id int, addr string, stop <-chan struct{}, s *loadStats) {
	const maxRounds, maxMsg = 100000, 4 << 10
	var c net.Conn
	defer func() {
		if c != nil {
			// The end: our FIN, then the server's.
			c.(*net.TCPConn).CloseWrite()
			if n, err := io.Copy(io.Discard, c); n != 0 || err != nil {
				s.problem("echo %d: closing: %d bytes, %v; want EOF", id, n, err)
			}
			c.Close()
		}
	}()
	buf := make([]byte, maxMsg)
	for seq := 0; seq < maxRounds; {
		select {
		case <-stop:
			return
		default:
		}
		who := fmt.Sprintf("echo %d round %d", id, seq)
		if c == nil {
			var err error
			if c, err = net.DialTimeout("tcp", addr, deadline); err != nil {
				c = nil
				s.dialErr(who, err)
				return
			}
			c.SetDeadline(time.Now().Add(time.Minute))
		}
		msg := message(1000+id, seq, 1+(id*7919+seq*104729)%maxMsg)
		_, werr := c.Write(msg)
		n, rerr := io.ReadFull(c, buf[:len(msg)])
		switch {
		case !bytes.Equal(buf[:n], msg[:n]):
			s.problem("%s: the echo is not an exact prefix of the message", who)
			return
		case werr == nil && rerr == nil:
			s.rounds.Add(1)
			seq++
			continue
		case isReset(werr) || isReset(rerr):
			s.resets.Add(1)
			s.problem("%s: reset: write %v, read %v after %d of %d bytes", who, werr, rerr, n, len(msg))
			return
		case werr == nil && (errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)):
			// The server ended the connection gracefully: connect again and
			// run this round again.
			s.reconnects.Add(1)
			c.Close()
			c = nil
		default:
			s.problem("%s: write %v, read %v after %d of %d bytes", who, werr, rerr, n, len(msg))
			return
		}
	}
}

// TestUpgradeUnderLoad is the proof of zero-downtime restarts: the server
// (with -pid-file, and no -upgrade: restarts are its default) serves a churn load (the tutorial's exchange on a
// new connection each time) and an echo load (round trips on persistent
// connections) while it is restarted three times by SIGHUP. Each time the
// pid file comes to name the new process, and the old one exits 0. No
// connection is refused or reset, and every echo is exact. The old
// process's Shutdown ends the persistent connections gracefully (FIN): the
// echo load connects again and carries on. Each new process tells systemd
// (NOTIFY_SOCKET) READY=1 and its MAINPID; STOPPING=1 comes only at the
// final SIGTERM.
func TestUpgradeUnderLoad(t *testing.T) {
	if err := becomeSubreaper(); err != nil {
		t.Skipf("cannot become the child subreaper: %v", err)
	}
	bin := buildServer(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "server.pid")
	notify := newNotifySocket(t)
	log, logFile := newServerLog(t, dir)
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0", "-pid-file", pidFile, "-shutdown-timeout", "8s")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.path)
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pids := []int{cmd.Process.Pid}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		<-exited
		for _, pid := range pids[1:] {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	}()
	addr := log.listeningAddr(1)
	waitFor(t, "the pid file", func() bool { return readPID(pidFile) == cmd.Process.Pid })

	const churners, echoers, upgrades = 8, 8, 3
	var s loadStats
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for id := range churners {
		wg.Go(func() { churnLoad(id, addr, stop, &s) })
	}
	for id := range echoers {
		wg.Go(func() { echoLoad(id, addr, stop, &s) })
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()
	// progress waits until the load has made some progress on the process
	// now serving.
	progress := func(what string) {
		c0, r0 := s.churned.Load(), s.rounds.Load()
		waitFor(t, what, func() bool { return s.churned.Load() >= c0+200 && s.rounds.Load() >= r0+200 })
	}
	progress("the load on the first process")

	for i := 1; i <= upgrades; i++ {
		old := pids[len(pids)-1]
		if err := syscall.Kill(old, syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		var next int
		waitFor(t, fmt.Sprintf("restart %d: a new pid in the pid file", i), func() bool {
			next = readPID(pidFile)
			return next != 0 && next != old
		})
		pids = append(pids, next)
		if i == 1 {
			select {
			case err := <-exited:
				exited <- err
				if err != nil {
					t.Errorf("restart %d: the old process exited: %v, want 0", i, err)
				}
			case <-time.After(deadline):
				t.Fatalf("restart %d: the old process did not exit", i)
			}
		} else if ws := waitPID(t, old); ws.ExitStatus() != 0 || !ws.Exited() {
			t.Errorf("restart %d: the old process ended %v, want exit 0", i, ws)
		}
		progress(fmt.Sprintf("the load on the process of restart %d", i))
	}
	stopLoad()

	last := pids[len(pids)-1]
	syscall.Kill(last, syscall.SIGTERM)
	if ws := waitPID(t, last); ws.ExitStatus() != 0 || !ws.Exited() {
		t.Errorf("the last process ended %v after SIGTERM, want exit 0", ws)
	}

	t.Logf("%d churn exchanges and %d echo round trips exact; %d churn exchanges cut short; %d persistent echo connections ended by a draining server (FIN after an exact round trip), reconnected",
		s.churned.Load(), s.rounds.Load(), s.cut.Load(), s.reconnects.Load())
	if n := s.refused.Load(); n != 0 {
		t.Errorf("%d connections refused", n)
	}
	if n := s.resets.Load(); n != 0 {
		t.Errorf("%d connections reset", n)
	}
	for _, p := range s.problems {
		t.Error(p)
	}
	if n := strings.Count(log.String(), "restart done"); n != upgrades {
		t.Errorf("the log tells %d restarts done, want %d", n, upgrades)
	}
	if _, err := os.Stat(pidFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the pid file is still there after the last process stopped: %v", err)
	}

	// systemd's notifications: each process READY=1 with its pid, in turn;
	// STOPPING=1 once, from the last.
	var want []string
	for _, pid := range pids {
		want = append(want, fmt.Sprintf("READY=1\nMAINPID=%d", pid))
	}
	want = append(want, "STOPPING=1")
	waitFor(t, "the notifications", func() bool { return len(notify.messages()) >= len(want) })
	if got := notify.messages(); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("systemd was notified %q, want %q", got, want)
	}
}

// TestUpgradeUnixSocket: a restart hands a Unix socket on: the old process
// exits without removing the socket file, the new one serves it, and the
// file is removed when the last process stops.
func TestUpgradeUnixSocket(t *testing.T) {
	if err := becomeSubreaper(); err != nil {
		t.Skipf("cannot become the child subreaper: %v", err)
	}
	bin := buildServer(t)
	dir, err := os.MkdirTemp("", "sockfsm") // short: socket paths are
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path, pidFile := filepath.Join(dir, "echo.sock"), filepath.Join(dir, "server.pid")
	log, logFile := newServerLog(t, t.TempDir())
	cmd := exec.Command(bin, "-addr", "unix:"+path, "-upgrade", "-pid-file", pidFile)
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pids := []int{cmd.Process.Pid}
	defer func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		cmd.Wait()
	}()
	if got := log.listeningAddr(1); got != path {
		t.Fatalf("listening on %s, want %s", got, path)
	}
	waitFor(t, "the pid file", func() bool { return readPID(pidFile) == cmd.Process.Pid })
	exchangeUnix := func(when string) {
		t.Helper()
		c, err := net.DialTimeout("unix", path, deadline)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		msg := "this is a test"
		if got, err := exchangeOn(c, []byte(msg)); err != nil || string(got) != msg {
			t.Errorf("%s: exchange %q, %v; want %q then EOF", when, got, err, msg)
		}
	}
	exchangeUnix("before the restart")

	syscall.Kill(cmd.Process.Pid, syscall.SIGHUP)
	waitFor(t, "a new pid in the pid file", func() bool {
		pid := readPID(pidFile)
		return pid != 0 && pid != cmd.Process.Pid
	})
	next := readPID(pidFile)
	pids = append(pids, next)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the process replaced by the restart exited: %v, want 0", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the socket file is gone after the old process exited: %v", err)
	}
	exchangeUnix("after the restart")

	syscall.Kill(next, syscall.SIGTERM)
	if ws := waitPID(t, next); ws.ExitStatus() != 0 || !ws.Exited() {
		t.Errorf("the restarted server ended %v after SIGTERM, want exit 0", ws)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket file is still there after the last process stopped: %v", err)
	}
}

// TestSystemdUnits: the units of deploy/systemd pass systemd-analyze
// verify (with ExecStart pointed at a binary built here), the service
// runs the flags it relies on (-upgrade for ExecReload), and its
// TimeoutStopSec leaves room for the server's -shutdown-timeout, within
// which the lingering connections end too (-linger-time no longer than
// it), so that systemd's SIGKILL never cuts a graceful shutdown short.
func TestSystemdUnits(t *testing.T) {
	dir := t.TempDir()
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	socket, service := read("sockfsm-echo.socket"), read("sockfsm-echo.service")
	setting := func(unit, key string) string {
		m := regexp.MustCompile(`(?m)^` + key + `=(.*)$`).FindStringSubmatch(unit)
		if m == nil {
			t.Fatalf("no %s= in the unit", key)
		}
		return m[1]
	}
	if got := setting(socket, "ListenStream"); got != "27015" {
		t.Errorf("ListenStream=%s, want the tutorial's 27015", got)
	}
	if got := setting(service, "KillSignal"); got != "SIGTERM" {
		t.Errorf("KillSignal=%s, want SIGTERM", got)
	}
	execStart := setting(service, "ExecStart")
	args := strings.Fields(execStart)
	o, err := parse(args[1:], io.Discard)
	if err != nil {
		t.Fatalf("ExecStart's flags: %v", err)
	}
	if !o.upgrade || !strings.Contains(setting(service, "ExecReload"), "-HUP") {
		t.Errorf("ExecReload sends SIGHUP: ExecStart needs -upgrade (%s)", execStart)
	}
	stop, err := time.ParseDuration(setting(service, "TimeoutStopSec"))
	if err != nil {
		t.Fatal(err)
	}
	if stop < o.shutdownTimeout+5*time.Second {
		t.Errorf("TimeoutStopSec=%v leaves less than 5s beyond -shutdown-timeout %v", stop, o.shutdownTimeout)
	}
	if o.cfg.LingerTime > o.shutdownTimeout {
		t.Errorf("-linger-time %v is longer than -shutdown-timeout %v: lingering connections would be aborted", o.cfg.LingerTime, o.shutdownTimeout)
	}

	tool := testutil.Tool(t, "systemd-analyze", "systemd")
	bin := buildServer(t)
	if err := os.WriteFile(filepath.Join(dir, "sockfsm-echo.socket"), []byte(socket), 0o644); err != nil {
		t.Fatal(err)
	}
	service = strings.ReplaceAll(service, args[0], bin)
	if err := os.WriteFile(filepath.Join(dir, "sockfsm-echo.service"), []byte(service), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(tool, "verify", filepath.Join(dir, "sockfsm-echo.socket"), filepath.Join(dir, "sockfsm-echo.service"))
	if out, err := cmd.CombinedOutput(); err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
