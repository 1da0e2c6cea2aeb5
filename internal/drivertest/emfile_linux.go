//go:build linux

package drivertest

// Running out of file descriptors: the server, in a child process whose
// RLIMIT_NOFILE is low, must back off without spinning and recover.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// emfileEnv makes the test binary, run again, be the server of testEMFILE.
const emfileEnv = "SOCKFSM_DRIVERTEST_EMFILE_CHILD"

// emfileSlots is how many file descriptors the child has left for
// connections.
const emfileSlots = 4

// emfileText is how EMFILE reads in a log: the driver must log its accept
// errors with the error.
var emfileText = syscall.EMFILE.Error() // "too many open files"

// emfileChild is the server of testEMFILE, in its own process: it serves
// Echo on 127.0.0.1:0 with a server from f, runs one exchange with itself
// (so that the driver has opened whatever descriptors it keeps, its pollers
// say, before the limit is set), lowers its RLIMIT_NOFILE to leave
// emfileSlots descriptors free, prints "addr ADDR" on stdout and logs to
// stderr, and shuts down when its stdin is closed. It returns the exit
// code.
func emfileChild(f Factory) int {
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "emfile child: "+format+"\n", a...)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail("listen: %v", err)
	}
	srv := f(sockfsm.Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}, conntest.Always(sockfsm.Echo{}))
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// The exchange with itself.
	c, err := net.DialTimeout("tcp", ln.Addr().String(), clientDeadline)
	if err != nil {
		return fail("dial: %v", err)
	}
	c.SetDeadline(time.Now().Add(clientDeadline))
	if _, err := c.Write([]byte("x")); err != nil {
		return fail("write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "x" {
		return fail("the first exchange: %q, %v", b, err)
	}
	c.Close()
	for deadline := time.Now().Add(clientDeadline); srv.NumConns() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			return fail("the first connection did not close")
		}
	}

	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fail("%v", err)
	}
	open := map[int]bool{}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil {
			open[fd] = true
		}
	}
	// RLIMIT_NOFILE bounds descriptor numbers, not their count: the limit
	// is set just above the emfileSlots-th free number. (One of the
	// descriptors listed was the listing's own, closed since: one slot
	// more.)
	limit, free := 0, 0
	for ; free < emfileSlots; limit++ {
		if !open[limit] {
			free++
		}
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fail("getrlimit: %v", err)
	}
	lim.Cur = uint64(limit)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fail("setrlimit: %v", err)
	}
	fmt.Printf("addr %s\n", ln.Addr())
	fmt.Fprintf(os.Stderr, "emfile child: %d descriptors open, RLIMIT_NOFILE now %d\n", len(ents), lim.Cur)
	io.Copy(io.Discard, os.Stdin)
	ctx, cancel := context.WithTimeout(context.Background(), clientDeadline)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return fail("shutdown: %v", err)
	}
	select {
	case err := <-served:
		if !errors.Is(err, sockfsm.ErrServerClosed) {
			return fail("serve: %v", err)
		}
	case <-time.After(clientDeadline):
		return fail("Serve did not return after Shutdown")
	}
	if n := srv.NumConns(); n != 0 {
		return fail("NumConns after Shutdown = %d", n)
	}
	return 0
}

// procCPUTicks returns the user plus system CPU time of process pid, in
// clock ticks, from /proc/PID/stat.
func procCPUTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces;
	// utime and stime are fields 14 and 15, the 12th and 13th after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc/%d/stat: %q", pid, s)
	}
	fs := strings.Fields(s[i+1:])
	if len(fs) < 13 {
		return 0, fmt.Errorf("malformed /proc/%d/stat: %q", pid, s)
	}
	utime, err1 := strconv.ParseInt(fs[11], 10, 64)
	stime, err2 := strconv.ParseInt(fs[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("malformed /proc/%d/stat: %q", pid, s)
	}
	return utime + stime, nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// runPattern is a -test.run pattern that matches the test named name, and
// its parents, only.
func runPattern(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	return strings.Join(parts, "/")
}

// testEMFILE: a server that runs out of file descriptors. The child
// process (this test binary, run again for this test only with
// SOCKFSM_DRIVERTEST_EMFILE_CHILD=1) lowers its RLIMIT_NOFILE; the test
// holds connections open until the next one is left in the listen queue
// because accept fails with EMFILE and the child logs it. While that lasts
// the child must back off, not spin: over a window of about a second it may
// use at most half of one core (a generous bound against a busy loop;
// backing off, it uses almost none). Once the held connections are closed,
// the waiting connections are accepted and served, and so is a new one;
// the child then shuts down cleanly.
func testEMFILE(t *testing.T, f Factory) {
	if os.Getenv(emfileEnv) == "1" {
		os.Exit(emfileChild(f))
	}

	cmd := exec.Command(os.Args[0], "-test.run="+runPattern(t.Name()), "-test.count=1")
	cmd.Env = append(os.Environ(), emfileEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the child: %v", err)
	}
	var (
		logMu   sync.Mutex
		logs    []string
		retries atomic.Int64
	)
	firstRetry := make(chan struct{})
	stderrDone := make(chan struct{})
	go func() {
		defer close(stderrDone)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			logMu.Lock()
			logs = append(logs, line)
			logMu.Unlock()
			if strings.Contains(line, emfileText) {
				if retries.Add(1) == 1 {
					close(firstRetry)
				}
			}
		}
	}()
	addrc := make(chan string, 1)
	stdoutDone := make(chan struct{})
	go func() {
		defer close(stdoutDone)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "addr "); ok {
				select {
				case addrc <- a:
				default:
				}
			}
		}
	}()
	// Wait may be called only once the pipes have been read to the end.
	exited := make(chan error, 1)
	go func() {
		<-stderrDone
		<-stdoutDone
		exited <- cmd.Wait()
	}()
	var (
		exitErr  error
		hasExit  bool
		waitExit = func(d time.Duration) bool {
			if !hasExit {
				select {
				case exitErr = <-exited:
					hasExit = true
				case <-time.After(d):
				}
			}
			return hasExit
		}
	)
	defer func() {
		// Whatever happened, the child ends and is waited for.
		stdin.Close()
		if !waitExit(clientDeadline) {
			cmd.Process.Kill()
			waitExit(clientDeadline)
		}
		if t.Failed() {
			logMu.Lock()
			t.Logf("child's log:\n%s", strings.Join(logs, "\n"))
			logMu.Unlock()
		}
	}()

	var addr string
	select {
	case addr = <-addrc:
	case <-stdoutDone:
		t.Fatal("the child exited without printing its address")
	case <-time.After(clientDeadline):
		t.Fatal("the child did not print its address")
	}

	// probe sends one byte on c and waits for its echo in a goroutine.
	probe := func(c *net.TCPConn) <-chan error {
		done := make(chan error, 1)
		if _, err := c.Write([]byte{'x'}); err != nil {
			done <- err
			return done
		}
		go func() {
			b := make([]byte, 1)
			_, err := io.ReadFull(c, b)
			if err == nil && b[0] != 'x' {
				err = fmt.Errorf("echo %q, want %q", b, "x")
			}
			done <- err
		}()
		return done
	}

	// Hold served connections until one is not accepted.
	type pending struct {
		c      *net.TCPConn
		echoed <-chan error
	}
	var (
		held    []*net.TCPConn
		waiting []pending
	)
	for i := 0; len(waiting) == 0; i++ {
		if i == 64 {
			t.Fatalf("%d connections were served: the child never ran out of descriptors", i)
		}
		c := dial(t, addr)
		done := probe(c)
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("connection %d: %v", i+1, err)
			}
			held = append(held, c)
		case <-firstRetry:
			waiting = append(waiting, pending{c, done})
		case <-time.After(clientDeadline):
			t.Fatalf("connection %d was neither served nor refused by an accept error", i+1)
		}
	}
	t.Logf("%d connections served; the next one waits in the listen queue", len(held))
	// A descriptor the child's runtime opens for a moment (the race
	// detector's runtime does) frees a slot when it closes, and a retry
	// then accepts one waiting connection. With a few more queued, one is
	// always left waiting: EMFILE lasts.
	for range 3 {
		c := dial(t, addr)
		waiting = append(waiting, pending{c, probe(c)})
	}

	// While EMFILE lasts, the child backs off.
	pid := cmd.Process.Pid
	cpu0, err := procCPUTicks(pid)
	if err != nil {
		t.Fatal(err)
	}
	r0, w0 := retries.Load(), time.Now()
	time.Sleep(1200 * time.Millisecond) // the measurement window
	cpu1, err := procCPUTicks(pid)
	if err != nil {
		t.Fatal(err)
	}
	wall := time.Since(w0)
	share := float64(cpu1-cpu0) / clockTicks / wall.Seconds()
	unserved := 0
	for i, w := range waiting {
		select {
		case err := <-w.echoed:
			if err != nil {
				t.Fatalf("waiting connection %d: %v", i+1, err)
			}
			waiting[i].echoed = nil // served: it holds a descriptor now
		default:
			unserved++
		}
	}
	t.Logf("EMFILE window: %d CPU ticks in %v (%.1f%% of one core); %d accept errors logged in it, %d in all; %d of %d waiting connections still waiting",
		cpu1-cpu0, wall.Round(time.Millisecond), 100*share, retries.Load()-r0, retries.Load(), unserved, len(waiting))
	if unserved == 0 {
		t.Fatalf("every waiting connection was served during the window: EMFILE did not last")
	}
	if share > 0.5 {
		t.Errorf("the child used %.0f%% of a core while accept failed with EMFILE: a busy loop", 100*share)
	}

	// Recovery: free the descriptors; the waiting connections are served.
	for _, c := range held {
		conntest.CloseWrite(t, c)
		if b := conntest.ReadToEOF(t, c); len(b) != 0 {
			t.Fatalf("held connection: read %q after its echo; want EOF", b)
		}
		c.Close()
	}
	for i, w := range waiting {
		if w.echoed != nil {
			select {
			case err := <-w.echoed:
				if err != nil {
					t.Fatalf("waiting connection %d: %v", i+1, err)
				}
			case <-time.After(clientDeadline):
				t.Fatalf("waiting connection %d was not served after descriptors were freed", i+1)
			}
		}
		conntest.CloseWrite(t, w.c)
		if b := conntest.ReadToEOF(t, w.c); len(b) != 0 {
			t.Fatalf("waiting connection %d: read %q after its echo; want EOF", i+1, b)
		}
		w.c.Close()
	}
	exchange(t, addr, []byte("this is a test"))

	// The child shuts down cleanly when told.
	stdin.Close()
	if !waitExit(clientDeadline) {
		t.Fatal("the child did not exit after its stdin was closed")
	}
	if exitErr != nil {
		t.Errorf("the child exited with %v", exitErr)
	}
}
