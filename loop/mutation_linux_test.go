package loop

// The loop's tests bite: each mutant in testdata/mutants is a deliberate
// bug of the loop, an exact-replacement patch in the format of the root
// package's mutants (see parseMutant), compiled in with go test -overlay,
// and the test tied to it below must fail, for the reason given. The code
// carries no test branch.
//
// TestLoopMutantsApply (fast, always run) checks that every mutant still
// applies exactly once and parses. TestLoopMutantsAreCaught (skipped with
// -short) builds and runs the tests against each:
//
//	go test -count=1 -run '^TestLoopMutants' -v ./loop

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// loopMutantCases ties each mutant to the test that must catch it and to
// fragments of the failure it must report (any of them, separated by |).
var loopMutantCases = []struct {
	mutant, test, want string
}{
	{"eagain-keeps-readable", "TestLoopProperties", "a loop spins"},
	{"short-read-drops-fin", "TestLoopProperties", "the socket has input"},
	{"timer-never-earlier", "TestLoopProperties", "the engine's deadline is in"},
	{"early-entry-dropped", "TestLoopProperties", "the engine's deadline is in"},
	{"no-epollout", "TestLoopProperties", "the socket has room"},
	{"hup-not-writable", "TestLoopProperties", "the socket has room"},
	{"level-triggered", "TestLoopProperties", "a loop spins"},
	{"level-triggered", "TestNoSpinFloodWithoutReading", "it spins"},
	// A lost wake-up shows as a loop asleep with work it was told of: a
	// request, input, room, a deadline, or Shutdown's drain.
	{"wake-lost", "TestLoopProperties", "with a request pending|the socket has room|the engine's deadline|no loop has a timer|and the loop sleeps|the server is not drained"},
	// Nothing reaches the loop, not even Shutdown: the test hangs in its
	// cleanup.
	{"wake-lost", "TestPushFromAnotherGoroutine", "never opened|test timed out"},
	{"wakefd-level-triggered", "TestPostIsAnEdge", "reported it again"},
	{"post-when-full-lost", "TestPostIsAnEdge", "counter full"},
	{"mail-missed-among-events", "TestLoopProperties", "with a request pending|the socket has room|the engine's deadline|no loop has a timer|and the loop sleeps|the server is not drained|never opened|did not take cmdExit"},
	{"listener-edge-triggered", "TestLoopProperties", "the listener's queue holds"},
	{"accept-until-eagain", "TestAcceptCalls", "one at a time"},
	{"accept-batch-never-grows", "TestAcceptCalls", "turns of the accepting loop"},
	{"budget-ends-at-close", "TestBudgetEndsAtClose", "NumConns 1"},
	{"nodelay-assumed-inherited", "TestLoopProperties", "Nagle's algorithm on"},
	{"nodelay-mptcp-trusted", "TestLoopProperties", "Nagle's algorithm on"},
	{"nodelay-never-set", "TestLoopProperties", "Nagle's algorithm on"},
	{"nagle-flag-dropped", "TestLoopProperties", "Nagle's algorithm on"},
	{"idle-never-parks", "TestIdleLoopsPark", "idle loops parked"},
	{"busy-wait-ignores-timer", "TestBusyTimeout", "busyTimeout.*want"},
	{"busy-wait-sleeps-to-tick", "TestBusyWaitEndsAtTimer", "always ended at the tick"},
	{"clock-stale", "TestKernelClock", "outside"},
	{"sigpipe-raised", "TestNoSIGPIPE", "raised SIGPIPE"},
	{"prelude-not-cut", "TestShutdownCutsPreludes", "gave up waiting for Shutdown's return"},
	{"prelude-slot-not-resumed", "TestPreludeHoldsItsSlot", "the waiting client|client read"},
	{"prelude-wrapper-trusted", "TestPreludeRefusals/wrapper", "the refused client read"},
	{"prelude-chain-not-followed", "TestPreludeServesTheSocket/tcp_readdressed_twice", "client read|client received"},
	{"prelude-emfile-drops", "TestDriversWithPrelude/EMFILE", "connection [0-9]+: "},
	{"eof-at-urgent-mark", "TestDrivers", "echo = .*want|reset"},
	{"no-epollpri", "TestDrivers", "echo = .*want|reset"},
	{"eof-on-unix", "TestUnixDescriptorsMidRequest", "echo = .*want|reset"},
	{"eof-on-any-short-read", "TestLoopProperties", "bytes unread: the kernel resets it"},
	{"woken-not-driven", "TestLoopProperties", "with a request pending|the socket has room|the engine's deadline|and the loop sleeps|the server is not drained"},
}

// loopMutantGaps are mutants no test catches, and why.
var loopMutantGaps = map[string]string{
	"pending-ignored-before-read": "equivalent: a request during a read or a wait always calls the waker",
}

const loopMutantDir = "testdata/mutants"

type loopMutant struct {
	name  string
	hunks []struct{ file, old, new string }
}

// parseMutant parses a mutant file: free text up to the first hunk, then
// hunks of
//
//	=== file.go
//	--- old
//	<lines that occur exactly once in file.go>
//	--- new
//	<the lines that replace them>
func parseMutant(name string, data []byte) (*loopMutant, error) {
	m := &loopMutant{name: name}
	state := ""
	for i, line := range strings.SplitAfter(string(data), "\n") {
		bare := strings.TrimSuffix(line, "\n")
		h := len(m.hunks) - 1
		switch {
		case strings.HasPrefix(bare, "=== "):
			if h >= 0 && state != "new" {
				return nil, fmt.Errorf("%s:%d: a hunk without \"--- new\"", name, i+1)
			}
			m.hunks = append(m.hunks, struct{ file, old, new string }{file: strings.TrimSpace(bare[4:])})
			state = "header"
		case bare == "--- old" && state == "header":
			state = "old"
		case bare == "--- new" && state == "old":
			state = "new"
		case state == "old":
			m.hunks[h].old += line
		case state == "new":
			m.hunks[h].new += line
		case state == "header" && strings.TrimSpace(bare) != "":
			return nil, fmt.Errorf("%s:%d: text between \"=== file\" and \"--- old\"", name, i+1)
		}
	}
	if len(m.hunks) == 0 || state != "new" {
		return nil, fmt.Errorf("%s: no complete hunk", name)
	}
	for _, h := range m.hunks {
		if strings.HasSuffix(h.file, "_test.go") || !strings.HasSuffix(h.file, ".go") || strings.TrimSpace(h.old) == "" || h.old == h.new {
			return nil, fmt.Errorf("%s: a hunk on %q that mutates nothing or a test", name, h.file)
		}
	}
	return m, nil
}

// apply returns the mutated files, by name.
func (m *loopMutant) apply() (map[string][]byte, error) {
	out := map[string][]byte{}
	for i, h := range m.hunks {
		src, ok := out[h.file]
		if !ok {
			var err error
			if src, err = os.ReadFile(h.file); err != nil {
				return nil, err
			}
		}
		if n := bytes.Count(src, []byte(h.old)); n != 1 {
			return nil, fmt.Errorf("mutant %s, hunk %d: its old block occurs %d times in %s, want once: re-express the bug in %s/%s.txt",
				m.name, i+1, n, h.file, loopMutantDir, m.name)
		}
		out[h.file] = bytes.Replace(src, []byte(h.old), []byte(h.new), 1)
	}
	return out, nil
}

func loadLoopMutants(t *testing.T) map[string]*loopMutant {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(loopMutantDir, "*.txt"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no mutants in %s: %v", loopMutantDir, err)
	}
	ms := map[string]*loopMutant{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		m, err := parseMutant(strings.TrimSuffix(filepath.Base(p), ".txt"), data)
		if err != nil {
			t.Error(err)
			continue
		}
		files, err := m.apply()
		if err != nil {
			t.Error(err)
			continue
		}
		for f, src := range files {
			if _, err := parser.ParseFile(token.NewFileSet(), f, src, 0); err != nil {
				t.Errorf("mutant %s does not parse: %v", m.name, err)
			}
		}
		ms[m.name] = m
	}
	listed := map[string]bool{}
	for _, c := range loopMutantCases {
		listed[c.mutant] = true
	}
	for name := range loopMutantGaps {
		listed[name] = true
	}
	for name := range listed {
		if ms[name] == nil {
			t.Errorf("mutant %s is listed but does not load", name)
		}
	}
	for name := range ms {
		if !listed[name] {
			t.Errorf("mutant %s is in neither loopMutantCases nor loopMutantGaps", name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return ms
}

// TestLoopMutantsApply: every mutant applies exactly and parses.
func TestLoopMutantsApply(t *testing.T) {
	t.Logf("%d mutants apply", len(loadLoopMutants(t)))
}

// TestLoopMutantsAreCaught runs each mutant's test against it, expecting
// the failure given.
func TestLoopMutantsAreCaught(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the tests once per mutant: run without -short")
	}
	if os.Getenv("SOCKFSM_MUTANT") != "" {
		t.Skip("inside a mutant's run")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build the mutants with")
	}
	ms := loadLoopMutants(t)
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	sem := make(chan struct{}, 2) // mutants built and run at once
	for name, m := range ms {
		var tests, wants []string
		for _, c := range loopMutantCases {
			if c.mutant == name {
				tests = append(tests, c.test)
				wants = append(wants, c.want)
			}
		}
		if len(tests) == 0 {
			continue // a gap
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			sem <- struct{}{}
			defer func() { <-sem }()
			files, err := m.apply()
			if err != nil {
				t.Fatal(err)
			}
			overlay := map[string]map[string]string{"Replace": {}}
			for f, src := range files {
				p := filepath.Join(tmp, name+"-"+f)
				if err := os.WriteFile(p, src, 0o644); err != nil {
					t.Fatal(err)
				}
				overlay["Replace"][filepath.Join(dir, f)] = p
			}
			ov, _ := json.Marshal(overlay)
			ovPath := filepath.Join(tmp, name+".json")
			if err := os.WriteFile(ovPath, ov, 0o644); err != nil {
				t.Fatal(err)
			}
			bin := filepath.Join(tmp, name+".test")
			if out, err := exec.Command(goTool, "test", "-c", "-o", bin, "-overlay="+ovPath, ".").CombinedOutput(); err != nil {
				t.Fatalf("building the mutant: %v\n%s", err, out)
			}
			for i, test := range tests {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
				cmd := exec.CommandContext(ctx, bin, "-test.count=1", "-test.v", "-test.timeout=1m", "-test.run=^"+test+"$", "-rapid.checks=2000")
				cmd.Env = append(os.Environ(), "SOCKFSM_MUTANT="+name)
				cmd.Dir = tmp // rapid's fail files go there, not into the package
				out, err := cmd.CombinedOutput()
				cancel()
				switch {
				case err == nil:
					t.Errorf("%s passes against the mutant: it does not catch it", test)
				case !regexp.MustCompile(wants[i]).Match(out):
					t.Errorf("%s fails against the mutant, but not with %q:\n%s", test, wants[i], tail(out, 40))
				default:
					t.Logf("%s catches it", test)
				}
			}
		})
	}
}

// tail returns the last n lines of out.
func tail(out []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
