package main

// Tests of the echo server program: its flags and exit codes through run,
// the tutorial's story with -v, and a real process shut down by SIGTERM in
// the middle of a load of clients.
//
// No test asserts how long anything took; every socket and every wait has
// a deadline (deadline) so that a bug fails a test instead of hanging it.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"github.com/sockfsm/sockfsm/internal/testutil"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the run if a goroutine outlives the tests. The tests that
// call run in-process do so many times, and tableflip allows one Upgrader
// per process: -upgrade is off by default for them (the restart tests exec
// the binary, where it is on).
func TestMain(m *testing.M) {
	upgradeByDefault = false
	goleak.VerifyTestMain(m)
}

// deadline bounds every socket operation and every wait in these tests.
const deadline = 10 * time.Second

// startProcess starts cmd with its stdout in story and its stderr copied,
// line by line, to logs. It returns a channel that gets the address of the
// server's "listening" log line, one closed when its stderr ends, and one
// that gets cmd.Wait's result once the process has exited and its stderr
// is read.
func startProcess(t *testing.T, cmd *exec.Cmd, story, logs io.Writer) (addr <-chan string, logsDone <-chan struct{}, exited <-chan error) {
	t.Helper()
	cmd.Stdout = story
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addrc := make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		re := regexp.MustCompile(`msg=listening addr=(\S+)`)
		for sc.Scan() {
			fmt.Fprintln(logs, sc.Text())
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case addrc <- m[1]:
				default:
				}
			}
		}
	}()
	exit := make(chan error, 1)
	go func() { <-done; exit <- cmd.Wait() }()
	return addrc, done, exit
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer = testutil.SyncBuffer

// runResult runs run(args) without a listener and returns its exit code
// and output. It is for arguments that make run return at once.
func runResult(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &errb, make(chan os.Signal), nil) }()
	select {
	case code = <-done:
	case <-time.After(deadline):
		t.Fatalf("run(%q) did not return", args)
	}
	return code, out.String(), errb.String()
}

// TestFlags: bad flags exit 2 with the usage, an address the server cannot
// listen on exits 1 with a one-line error, -h exits 0 with the usage.
func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string // in stderr
	}{
		{[]string{"-nope"}, 2, "flag provided but not defined: -nope"},
		{[]string{"-idle-timeout", "soon"}, 2, "invalid value"},
		{[]string{"extra"}, 2, "unexpected arguments: extra"},
		{[]string{"-shutdown-timeout", "0"}, 2, "-shutdown-timeout must be positive"},
		{[]string{"-write-timeout", "-1s"}, 2, "WriteTimeout cannot be off"},
		{[]string{"-linger-time", "-1s"}, 2, "LingerTime cannot be off"},
		{[]string{"-log-level", "loud"}, 2, `bad -log-level "loud"`},
		{[]string{"-driver", "threads"}, 2, `bad -driver "threads"`},
		{[]string{"-h"}, 0, "Usage: server [flags]"},
		{[]string{"-help"}, 0, "Usage: server [flags]"},
	} {
		code, stdout, stderr := runResult(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("run(%q) = %d, stderr:\n%s\nwant %d and %q in stderr", tc.args, code, stderr, tc.code, tc.want)
		}
		if stdout != "" {
			t.Errorf("run(%q) wrote to stdout: %q", tc.args, stdout)
		}
	}

	for _, addr := range []string{"nonsense", "127.0.0.1:99999", "127.0.0.1:-1"} {
		code, _, stderr := runResult(t, "-addr", addr)
		if code != 1 {
			t.Errorf("run(-addr %s) = %d, want 1", addr, code)
		}
		if lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], "server: ") {
			t.Errorf("run(-addr %s) wrote %q to stderr, want one line starting with %q", addr, stderr, "server: ")
		}
	}

	// An address in use: the second server cannot listen.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	code, _, stderr := runResult(t, "-addr", ln.Addr().String())
	if code != 1 || !strings.Contains(stderr, "address already in use") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("run(-addr %s) with the address in use = %d, stderr %q; want 1 and a one-line error", ln.Addr(), code, stderr)
	}
}

// TestVerboseStory: with -v, one exchange of the tutorial's client is told
// the tutorial's way, and the server exits 0 on a signal.
func TestVerboseStory(t *testing.T) {
	var stdout, stderr syncBuffer
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	done := make(chan int, 1)
	go func() { done <- run([]string{"-addr", "127.0.0.1:0", "-v"}, &stdout, &stderr, sigs, ready) }()
	var addr net.Addr
	select {
	case addr = <-ready:
	case code := <-done:
		t.Fatalf("run returned %d before listening; stderr:\n%s", code, stderr.String())
	case <-time.After(deadline):
		t.Fatal("the server did not start")
	}

	msg := "this is a test"
	got, err := exchange(addr.String(), []byte(msg))
	if err != nil || string(got) != msg {
		t.Errorf("exchange: %q, %v; want %q then EOF", got, err, msg)
	}

	sigs <- syscall.SIGTERM
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run returned %d after SIGTERM, want 0", code)
		}
	case <-time.After(deadline):
		t.Fatal("run did not return after SIGTERM")
	}
	story := stdout.String()
	for _, want := range []string{"Bytes received: 14", "Bytes sent: 14", "Connection closing...",
		"Connection closed: reason peer-closed", "receiving -> sending (output)"} {
		if !strings.Contains(story, want) {
			t.Errorf("the story lacks %q:\n%s", want, story)
		}
	}
	if logs := stderr.String(); !strings.Contains(logs, "server stopped") {
		t.Errorf("the log lacks %q:\n%s", "server stopped", logs)
	}
}

// TestDriverLoop: with -driver loop, the tutorial's exchange is served on
// the event loops (on Linux) with the same story, and the server exits 0
// on a signal; with -proxy-protocol required too, each client's PROXY
// header is read first, and the data after it is echoed whole.
func TestDriverLoop(t *testing.T) {
	for _, tc := range []struct {
		name   string
		args   []string
		header string
	}{
		{"plain", nil, ""},
		{"proxy-protocol", []string{"-proxy-protocol", "required"}, "PROXY TCP4 203.0.113.7 198.51.100.1 40000 27015\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) { testDriverLoop(t, tc.args, tc.header) })
	}
}

func testDriverLoop(t *testing.T, args []string, header string) {
	var stdout, stderr syncBuffer
	sigs := make(chan os.Signal, 1)
	ready := make(chan net.Addr, 1)
	done := make(chan int, 1)
	go func() {
		done <- run(append([]string{"-addr", "127.0.0.1:0", "-v", "-driver", "loop"}, args...), &stdout, &stderr, sigs, ready)
	}()
	var addr net.Addr
	select {
	case addr = <-ready:
	case code := <-done:
		t.Fatalf("run returned %d before listening; stderr:\n%s", code, stderr.String())
	case <-time.After(deadline):
		t.Fatal("the server did not start")
	}
	const msg = "this is a test"
	for range 3 {
		got, err := exchange(addr.String(), []byte(header+msg))
		if err != nil || string(got) != msg {
			t.Errorf("exchange: %q, %v; want %q then EOF", got, err, msg)
		}
	}
	sigs <- syscall.SIGTERM
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run returned %d after SIGTERM, want 0", code)
		}
	case <-time.After(deadline):
		t.Fatal("run did not return after SIGTERM")
	}
	story := stdout.String()
	for _, want := range []string{"Bytes received: 14", "Bytes sent: 14", "Connection closing...",
		"Connection closed: reason peer-closed", "receiving -> sending (output)"} {
		if n := strings.Count(story, want); n != 3 {
			t.Errorf("the story has %q %d times, want 3:\n%s", want, n, story)
		}
	}
	if runtime.GOOS == "linux" && !strings.Contains(stderr.String(), "driver=loop") {
		t.Errorf("no log line says the loop serves:\n%s", stderr.String())
	}
	if runtime.GOOS != "linux" && !strings.Contains(stderr.String(), "goroutine driver") {
		t.Errorf("no log line says the loop driver fell back:\n%s", stderr.String())
	}
}

// exchange is the tutorial's client: send msg, half-close, read to EOF. It
// returns what it read and the error that ended the read, nil for EOF.
func exchange(addr string, msg []byte) ([]byte, error) {
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// buildServer builds this command into a temporary directory.
func buildServer(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build the server with")
	}
	bin := filepath.Join(t.TempDir(), "server")
	if runtime.GOOS == "windows" {
		bin += ".exe"
	}
	out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// outcome is how one client exchange ended.
type outcome struct {
	client, seq int
	local       string    // the client's address: the server's story names connections by it
	sent, got   int       // bytes sent; bytes of echo received
	exact       bool      // the echo is a prefix of what was sent (all of it if got == sent)
	err         error     // what ended the read: nil for EOF
	end         time.Time // when the exchange ended
}

var storyEnd = regexp.MustCompile(`(?m)^conn \d+ (\S+): Connection (closed|aborted)`)

// TestSIGTERMUnderLoad: the real server process, under a load of 50
// clients each running the tutorial's exchange in a loop (send, half-close,
// read to EOF), gets SIGTERM. It stops accepting, lets the connections in
// flight finish gracefully and exits 0 within its shutdown timeout; then
// dials are refused.
//
// What a client in flight sees depends on how far its exchange had got:
// the server echoes what it had read, then sends its FIN (it half-closes
// idle connections at once, and lets busy ones flush first), and discards
// whatever arrives later, until the client's FIN. So every exchange ends
// with EOF after an exact prefix of its message, the whole of it if the
// exchange ended before the signal was sent. No connection the server
// accepted is reset; the one reset a client may see comes from its kernel,
// for a connection still in the listen queue when the server closed its
// listener, which the server never accepted, so its story never names it.
func TestSIGTERMUnderLoad(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no SIGTERM on Windows")
	}
	bin := buildServer(t)
	const shutdownTimeout = 8 * time.Second
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0", "-v",
		"-idle-timeout", "5s", "-write-timeout", "5s", "-linger-timeout", "2s", "-linger-time", "3s",
		"-shutdown-timeout", shutdownTimeout.String())
	var story, logs syncBuffer
	addrc, logsDone, exited := startProcess(t, cmd, &story, &logs)
	var (
		exitErr error
		hasExit bool
	)
	waitExit := func(d time.Duration) bool {
		if !hasExit {
			select {
			case exitErr = <-exited:
				hasExit = true
			case <-time.After(d):
			}
		}
		return hasExit
	}
	defer func() {
		if !waitExit(0) {
			cmd.Process.Kill()
			waitExit(deadline)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	}()

	var addr string
	select {
	case addr = <-addrc:
	case <-logsDone:
		t.Fatal("the server exited before listening")
	case <-time.After(deadline):
		t.Fatal("the server did not log its address")
	}

	const (
		clients   = 50
		maxRounds = 400  // per client: the load is bounded in count ...
		loadFor   = 1000 // ... and the signal comes after this many exchanges
		maxMsg    = 32 << 10
	)
	var (
		completed atomic.Int64
		signaled  atomic.Bool
		sigAt     time.Time // written before signaled is set
		mu        sync.Mutex
		outcomes  []outcome
		problems  []string
	)
	problem := func(format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		problems = append(problems, fmt.Sprintf(format, a...))
	}
	var wg sync.WaitGroup
	for id := range clients {
		wg.Go(func() {
			for seq := range maxRounds {
				msg := message(id, seq, 1+(id*7919+seq*104729)%maxMsg)
				o, dialErr := clientExchange(addr, msg)
				if dialErr != nil {
					if !signaled.Load() {
						problem("client %d round %d: dial before the signal: %v", id, seq, dialErr)
					} else if !errors.Is(dialErr, syscall.ECONNREFUSED) && !isReset(dialErr) {
						// A SYN that meets the listener as it closes is reset.
						problem("client %d round %d: dial after the signal: %v, want connection refused (or reset)", id, seq, dialErr)
					}
					return
				}
				o.client, o.seq = id, seq
				mu.Lock()
				outcomes = append(outcomes, o)
				mu.Unlock()
				completed.Add(1)
				if o.err != nil {
					return // judged below; this client's load stops
				}
			}
			if !signaled.Load() {
				problem("client %d ran all %d rounds before the signal", id, maxRounds)
			}
		})
	}

	clientsDone := make(chan struct{})
	go func() { wg.Wait(); close(clientsDone) }()

	// SIGTERM in the middle of the load.
	loadDeadline := time.Now().Add(3 * deadline)
load:
	for completed.Load() < loadFor {
		if waitExit(0) {
			t.Fatalf("the server exited under load: %v", exitErr)
		}
		mu.Lock()
		failing := len(problems) > 0
		mu.Unlock()
		if failing || time.Now().After(loadDeadline) {
			break
		}
		select {
		case <-clientsDone:
			break load // every client stopped: something is wrong, judged below
		case <-time.After(5 * time.Millisecond):
		}
	}
	sigAt = time.Now()
	signaled.Store(true)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-clientsDone:
	case <-time.After(shutdownTimeout + deadline):
		t.Fatal("the clients did not finish")
	}
	if !waitExit(shutdownTimeout + deadline) {
		t.Fatal("the server did not exit after SIGTERM")
	}
	if exitErr != nil {
		t.Errorf("the server exited with %v, want 0", exitErr)
	}
	if c, err := net.DialTimeout("tcp", addr, deadline); err == nil {
		c.Close()
		t.Errorf("a dial after the server exited succeeded")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a dial after the server exited: %v, want connection refused", err)
	}

	// Judge every exchange. The server's story names each connection it
	// accepted by the client's address, once, when it ends.
	accepted := map[string]int{}
	for _, m := range storyEnd.FindAllStringSubmatch(story.String(), -1) {
		accepted[m[1]]++
		if m[2] == "aborted" {
			t.Errorf("the server aborted a connection: %s", m[0])
		}
	}
	counted := map[string]int{}
	var full, short, kernelResets int
	for _, o := range outcomes {
		switch {
		case o.err == nil && o.exact && o.got == o.sent:
			full++
			counted[o.local]++
		case o.err == nil && o.exact:
			short++
			counted[o.local]++
			if o.end.Before(sigAt) {
				t.Errorf("client %d round %d: echo cut short at %d of %d bytes before the signal", o.client, o.seq, o.got, o.sent)
			}
		case isReset(o.err) && o.got == 0:
			kernelResets++ // checked against the story below
		default:
			t.Errorf("client %d round %d (%s): %d of %d bytes echoed (exact: %v), then %v; want EOF after an exact prefix",
				o.client, o.seq, o.local, o.got, o.sent, o.exact, o.err)
			counted[o.local]++
		}
	}
	for local, n := range accepted {
		if counted[local] < n {
			t.Errorf("%s: the server ended %d connections from it, the client saw %d end with EOF: a reset of a connection the server accepted",
				local, n, counted[local])
		}
	}
	for local, n := range counted {
		if accepted[local] < n {
			t.Errorf("%s: the client saw %d exchanges end with EOF, the server's story has %d", local, n, accepted[local])
		}
	}
	for _, p := range problems {
		t.Error(p)
	}
	logText := logs.String()
	for _, bad := range []string{"connection aborted", "shutdown deadline passed", "level=ERROR"} {
		if strings.Contains(logText, bad) {
			t.Errorf("the server logged %q", bad)
		}
	}
	if !strings.Contains(logText, "server stopped") {
		t.Errorf("the server did not log %q", "server stopped")
	}
	t.Logf("%d exchanges: %d whole, %d cut short by the shutdown (EOF after an exact prefix), %d reset in the listen queue",
		len(outcomes), full, short, kernelResets)
}

// message returns n bytes that name their client and round, so that an
// echo from another connection cannot pass for this one's.
func message(client, seq, n int) []byte {
	tag := fmt.Sprintf("[client %d round %d]", client, seq)
	b := make([]byte, n)
	for i := range b {
		b[i] = tag[i%len(tag)]
	}
	return b
}

// clientExchange runs one exchange of the tutorial's client. It returns a
// non-nil error only if the dial failed; how the exchange ended is in the
// outcome. The message is written while the echo is read, so that no size
// can fill both directions' buffers.
func clientExchange(addr string, msg []byte) (outcome, error) {
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		return outcome{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	o := outcome{local: c.LocalAddr().String(), sent: len(msg)}
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		written <- err
	}()
	got, err := io.ReadAll(c)
	o.got, o.err, o.end = len(got), err, time.Now()
	o.exact = bytes.HasPrefix(msg, got)
	c.Close() // every byte was read: a FIN; it also ends a write still blocked
	// A reset is reported once, to whichever of the write and the read
	// meets it first; a read after that returns EOF. So a write that met
	// the reset makes the exchange a reset, whatever the read saw.
	if werr := <-written; isReset(werr) {
		if o.err == nil {
			o.err = werr
		}
	}
	return o, nil
}

// isReset reports whether err is a reset: ECONNRESET, or EPIPE from a
// write once the reset has been reported.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// TestChooseDriver: -driver auto is the loop on Linux, except with TLS,
// which only the goroutine driver serves; the PROXY protocol runs on
// either; an explicit choice stands.
func TestChooseDriver(t *testing.T) {
	loopHere := "goroutine"
	if runtime.GOOS == "linux" {
		loopHere = "loop"
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, loopHere},
		{[]string{"-tls-cert", "c.pem", "-tls-key", "k.pem"}, "goroutine"},
		{[]string{"-proxy-protocol", "required"}, loopHere},
		{[]string{"-proxy-protocol", "off"}, loopHere},
		{[]string{"-driver", "goroutine"}, "goroutine"},
		{[]string{"-driver", "loop", "-proxy-protocol", "required"}, "loop"},
		{[]string{"-driver", "goroutine", "-proxy-protocol", "required"}, "goroutine"},
	} {
		o, err := parse(tc.args, io.Discard)
		if err != nil {
			t.Fatalf("parse(%q): %v", tc.args, err)
		}
		if got := chooseDriver(o); got != tc.want {
			t.Errorf("chooseDriver(%q) = %s, want %s", tc.args, got, tc.want)
		}
	}
}
