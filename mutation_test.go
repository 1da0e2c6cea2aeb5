package sockfsm

// The properties bite: each mutant in testdata/mutants is a deliberate bug,
// and the property tied to it below must fail, for the reason given. The
// code carries no test branch: a mutant is a small exact-replacement patch
// kept outside it (see parseMutant for the format), applied to a copy of
// the target file in a temporary directory and compiled in with go test
// -overlay. A mutant whose old block no longer occurs exactly once in the
// current source fails the test, so mutants cannot silently rot.
//
// TestMutantsApply (fast, always run) checks that every mutant still
// applies and parses. TestMutantsAreCaught (skipped with -short) builds a
// test binary per mutant and runs its properties in it:
//
//	go test -count=1 -run '^TestMutants' -v .
//
// With -mutants.survey it also runs every property against every mutant,
// the known gaps included, and logs which catch it: use it when adding a
// mutant or a property (docs/mutation.md).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var mutantSurvey = flag.Bool("mutants.survey", false,
	"TestMutantsAreCaught: run every property against every mutant, the known gaps included, and log which catch it")

// mutantCases ties each mutant (testdata/mutants/<mutant>.txt) to a
// property that must catch it, and to fragments of the failure it must
// report: any of them, separated by |.
var mutantCases = []struct {
	mutant string
	test   string
	want   string
}{
	// The old engine's nine planted bugs, re-expressed against the engine
	// of Start/Next/*Done and fsm's rules.
	{"skip-flush", "TestPropertyEchoIsExact", "received"},
	{"write-after-fin", "TestPropertyNoSendAfterShutdown", "after our half-close"},
	{"write-after-fin", "TestStateMachine", "writes after our half-close"},
	{"skip-linger", "TestPropertyEveryConnectionClosed", "unread input"},
	{"no-idle-timeout", "TestPropertyEveryConnectionClosed", "no deadline|bound is"},
	{"no-idle-timeout", "TestStateMachine", "no deadline|bound is"},
	{"no-write-timeout", "TestPropertyEveryConnectionClosed", "no deadline|bound is"},
	{"no-write-timeout", "TestStateMachine", "no deadline|bound is"},
	{"no-linger-time", "TestPropertyEveryConnectionClosed", "no deadline|bound is"},
	{"close-twice", "TestPropertyEveryConnectionClosed", "transport closed 2 times"},
	{"close-twice", "TestStateMachine", "transport closed 2 times"},
	{"notify-twice", "TestPropertyEveryConnectionClosed", "OnClose called 2 times"},
	{"notify-twice", "TestStateMachine", "OnClose 2 times"},
	// The simulation's properties hang on it instead: the sim's Read
	// returns EOF at once, without reaching the hook that bounds the
	// operations (docs/mutation.md).
	{"ignore-peer-fin", "TestStateMachine", "livelock"},
	// The new design's own places to break.
	{"write-accepted-after-close", "TestPropertyNoSendAfterShutdown", "not refused"},
	{"rule-order", "TestPropertyEchoIsExact", "received"},
	{"compiled-table-drift", "TestPropertyOnlyTableEdges", "looplab went to"},
	// A lost wake-up leaves the driver blocked: with no deadline, or past
	// the bound when a later event ends the wait.
	{"no-wake", "TestPropertyEveryConnectionClosed", "no deadline|bound is"},
	{"fin-before-closewrite", "TestPropertyEveryConnectionClosed", "reported early"},
	{"rule-no-linger-bytes", "TestPropertyEveryConnectionClosed", "after our FIN; LingerBytes"},
	// MinRate's own place to break: the window is judged, never short.
	{"min-rate-never-short", "TestPropertyMinRate", "after the first byte|want min-rate"},
}

// mutantGaps are mutants no property catches yet: gaps in the properties,
// not bugs of the mutants (docs/mutation.md says what would catch each).
// They are checked to apply, and run only with -mutants.survey. Once a
// property catches one, move it to mutantCases.
var mutantGaps = map[string]string{
	"guard-dropped": "equivalent for the engine: it never fires input or peer-fin after the peer's FIN " +
		"(the rules half-close at once), and checkEdges derives the reference from the same guard; fsm's tests catch it",
	"pending-not-set": "no request lands between Next and the blocking call: the sim runs the hook inside " +
		"Read, Write and Wait, and the state machine's driver handles requests before every operation",
}

// mutantProperties are the property tests a survey runs.
var mutantProperties = []string{
	"TestPropertyNoSendAfterShutdown",
	"TestPropertyEveryConnectionClosed",
	"TestPropertyEchoIsExact",
	"TestPropertyOnlyTableEdges",
	"TestStateMachine",
	"TestPropertyMinRate",
}

const (
	mutantDir    = "testdata/mutants"
	mutantEnv    = "SOCKFSM_MUTANT" // set: TestMutantsAreCaught skips (a mutant's runs, a mutation tool)
	mutantChecks = "2000"           // rapid cases per property run
	mutantRunMax = 3 * time.Minute  // one property run (a hang fails)
	surveyRunMax = 45 * time.Second // one property run in a survey
	mutantBuilds = 2                // mutants built and run at once
	mutantTotal  = 15 * time.Minute // everything
)

// A mutant is a deliberate bug: hunks of exact replacements, applied in
// order.
type mutant struct {
	name  string
	about string // the description before the first hunk
	hunks []mutantHunk
}

type mutantHunk struct {
	file     string // relative to the package directory
	old, new string // whole lines, each ending in "\n"
}

// parseMutant parses a mutant file:
//
//	Free text describing the bug, up to the first hunk.
//
//	=== engine.go
//	--- old
//	<lines that occur exactly once in engine.go>
//	--- new
//	<the lines that replace them; none to delete them>
//	=== driver.go
//	...
//
// A hunk's file is relative to the package directory; hunks on the same
// file apply in order, each to the result of the one before.
func parseMutant(name string, data []byte) (*mutant, error) {
	m := &mutant{name: name}
	text := string(data)
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	const (
		inAbout = iota
		inHeader
		inOld
		inNew
	)
	state := inAbout
	var about strings.Builder
	for i, line := range strings.SplitAfter(text, "\n") {
		if line == "" {
			continue
		}
		bare := strings.TrimSuffix(line, "\n")
		h := len(m.hunks) - 1
		switch {
		case strings.HasPrefix(bare, "=== "):
			if h >= 0 && state != inNew {
				return nil, fmt.Errorf("%s:%d: hunk for %s has no \"--- new\"", name, i+1, m.hunks[h].file)
			}
			m.hunks = append(m.hunks, mutantHunk{file: strings.TrimSpace(bare[4:])})
			state = inHeader
		case bare == "--- old":
			if state != inHeader {
				return nil, fmt.Errorf("%s:%d: \"--- old\" outside a hunk's header", name, i+1)
			}
			state = inOld
		case bare == "--- new":
			if state != inOld {
				return nil, fmt.Errorf("%s:%d: \"--- new\" before \"--- old\"", name, i+1)
			}
			state = inNew
		case state == inAbout:
			about.WriteString(line)
		case state == inHeader:
			if strings.TrimSpace(bare) != "" {
				return nil, fmt.Errorf("%s:%d: text between \"=== file\" and \"--- old\"", name, i+1)
			}
		case state == inOld:
			m.hunks[h].old += line
		case state == inNew:
			m.hunks[h].new += line
		}
	}
	if len(m.hunks) == 0 {
		return nil, fmt.Errorf("%s: no hunk (\"=== file\")", name)
	}
	if state != inNew {
		return nil, fmt.Errorf("%s: the last hunk has no \"--- new\"", name)
	}
	for i, h := range m.hunks {
		switch {
		case !filepath.IsLocal(h.file) || !strings.HasSuffix(h.file, ".go") || strings.HasSuffix(h.file, "_test.go"):
			return nil, fmt.Errorf("%s: hunk %d: %q is not a Go source file of the module", name, i+1, h.file)
		case strings.TrimSpace(h.old) == "":
			return nil, fmt.Errorf("%s: hunk %d: empty old block", name, i+1)
		case h.old == h.new:
			return nil, fmt.Errorf("%s: hunk %d: the new block is the old one", name, i+1)
		}
	}
	m.about = strings.TrimSpace(about.String())
	return m, nil
}

// apply applies m to the sources under dir and returns the mutated files,
// by name. It fails if an old block does not occur exactly once.
func (m *mutant) apply(dir string) (map[string][]byte, error) {
	out := map[string][]byte{}
	for i, h := range m.hunks {
		src, ok := out[h.file]
		if !ok {
			var err error
			if src, err = os.ReadFile(filepath.Join(dir, filepath.FromSlash(h.file))); err != nil {
				return nil, fmt.Errorf("mutant %s, hunk %d: %v", m.name, i+1, err)
			}
		}
		if n := bytes.Count(src, []byte(h.old)); n != 1 {
			return nil, fmt.Errorf("mutant %s, hunk %d: its old block occurs %d times in %s, want exactly once: "+
				"the code changed under the mutant; re-express the bug in %s/%s.txt\nold block:\n%s",
				m.name, i+1, n, h.file, mutantDir, m.name, h.old)
		}
		out[h.file] = bytes.Replace(src, []byte(h.old), []byte(h.new), 1)
	}
	return out, nil
}

// loadMutants parses every mutant and checks it applies to the current
// sources, that each mutated file still parses, and that the table and
// the files agree.
func loadMutants(t *testing.T, dir string) map[string]*mutant {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, mutantDir, "*.txt"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no mutants in %s: %v", mutantDir, err)
	}
	ms := map[string]*mutant{}
	for _, p := range paths {
		name := strings.TrimSuffix(filepath.Base(p), ".txt")
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		m, err := parseMutant(name, data)
		if err != nil {
			t.Error(err)
			continue
		}
		files, err := m.apply(dir)
		if err != nil {
			t.Error(err)
			continue
		}
		for f, src := range files {
			if _, err := parser.ParseFile(token.NewFileSet(), f, src, parser.SkipObjectResolution); err != nil {
				t.Errorf("mutant %s does not parse: %v", name, err)
			}
		}
		ms[name] = m
	}
	listed := map[string]bool{}
	for _, c := range mutantCases {
		listed[c.mutant] = true
		if !slices.Contains(mutantProperties, c.test) {
			t.Errorf("mutant %s: %s is not one of mutantProperties", c.mutant, c.test)
		}
	}
	for name := range mutantGaps {
		if listed[name] {
			t.Errorf("mutant %s is both in mutantCases and in mutantGaps", name)
		}
		listed[name] = true
	}
	for name := range listed {
		if _, err := os.Stat(filepath.Join(dir, mutantDir, name+".txt")); err != nil {
			t.Errorf("mutant %s is listed but %s/%s.txt is missing", name, mutantDir, name)
		}
	}
	for name := range ms {
		if !listed[name] {
			t.Errorf("%s/%s.txt is in neither mutantCases nor mutantGaps", mutantDir, name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return ms
}

// TestMutantsApply: every mutant still applies to the current sources
// exactly, and parses. It is fast, so it runs with -short too.
func TestMutantsApply(t *testing.T) {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	ms := loadMutants(t, dir)
	t.Logf("%d mutants apply", len(ms))
}

// mutantPlan is what runs for one mutant, or for the unmutated control.
type mutantPlan struct {
	name   string
	m      *mutant // nil: the control
	expect map[string]string
	survey bool // run every property, logging what it does
}

// TestMutantsAreCaught builds a test binary per mutant (go test -c
// -overlay) and runs each property tied to it there, expecting a failure
// with the given text; the unmutated package, the control, must pass the
// same properties.
func TestMutantsAreCaught(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a test binary per mutant: run without -short")
	}
	if os.Getenv(mutantEnv) != "" {
		t.Skip("inside a mutant's run")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the mutants: %v", err)
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	ms := loadMutants(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), mutantTotal)
	defer cancel()

	control := mutantPlan{name: "control", expect: map[string]string{}, survey: *mutantSurvey}
	plans := map[string]*mutantPlan{}
	var order []string
	for _, c := range mutantCases {
		p := plans[c.mutant]
		if p == nil {
			p = &mutantPlan{name: c.mutant, m: ms[c.mutant], expect: map[string]string{}, survey: *mutantSurvey}
			plans[c.mutant] = p
			order = append(order, c.mutant)
		}
		p.expect[c.test] = c.want
		control.expect[c.test] = ""
	}
	if *mutantSurvey {
		for name := range mutantGaps {
			plans[name] = &mutantPlan{name: name, m: ms[name], survey: true}
			order = append(order, name)
		}
	}
	slices.Sort(order)

	sem := make(chan struct{}, mutantBuilds)
	start := time.Now()
	t.Run("mutant", func(t *testing.T) {
		for _, p := range append([]*mutantPlan{&control}, mapValues(plans, order)...) {
			t.Run(p.name, func(t *testing.T) {
				t.Parallel()
				sem <- struct{}{}
				defer func() { <-sem }()
				runMutantPlan(ctx, t, goTool, dir, p)
			})
		}
	})
	t.Logf("%d mutants and the control in %v", len(plans), time.Since(start).Round(time.Second))
}

func mapValues(m map[string]*mutantPlan, order []string) []*mutantPlan {
	var out []*mutantPlan
	for _, k := range order {
		out = append(out, m[k])
	}
	return out
}

// runMutantPlan builds p's test binary and runs its properties.
func runMutantPlan(ctx context.Context, t *testing.T, goTool, dir string, p *mutantPlan) {
	tmp := t.TempDir()
	args := []string{"test", "-c", "-vet=off", "-o", filepath.Join(tmp, "mutant.test")}
	if p.m != nil {
		if gap, ok := mutantGaps[p.name]; ok {
			t.Logf("%s: known gap: %s", p.name, gap)
		}
		files, err := p.m.apply(dir)
		if err != nil {
			t.Fatal(err)
		}
		overlay := map[string]map[string]string{"Replace": {}}
		for f, src := range files {
			copyPath := filepath.Join(tmp, strings.ReplaceAll(filepath.ToSlash(f), "/", "_"))
			if err := os.WriteFile(copyPath, src, 0o644); err != nil {
				t.Fatal(err)
			}
			overlay["Replace"][filepath.Join(dir, filepath.FromSlash(f))] = copyPath
		}
		js, err := json.Marshal(overlay)
		if err != nil {
			t.Fatal(err)
		}
		ovl := filepath.Join(tmp, "overlay.json")
		if err := os.WriteFile(ovl, js, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-overlay", ovl)
	}
	args = append(args, ".")
	began := time.Now()
	build := exec.CommandContext(ctx, goTool, args...)
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the %s test binary failed (the mutant must compile): %v\n%s", p.name, err, out)
	}
	t.Logf("%s: built in %v", p.name, time.Since(began).Round(100*time.Millisecond))
	bin := filepath.Join(tmp, "mutant.test")

	tests := mapKeys(p.expect)
	if p.survey {
		tests = mutantProperties
	}
	for _, test := range tests {
		want, expected := p.expect[test]
		limit := mutantRunMax
		if !expected {
			limit = surveyRunMax
		}
		began := time.Now()
		out, failed, timedOut := runMutantProperty(ctx, t, bin, dir, p.name, test, limit)
		took := time.Since(began).Round(100 * time.Millisecond)
		switch {
		case !expected: // surveyed only
			switch {
			case timedOut:
				t.Logf("%s: survey: %s did not finish within %v (a hang)", p.name, test, limit)
			case failed:
				t.Logf("%s: survey: caught by %s in %v: %s", p.name, test, took, failureLine(out, nil))
			default:
				t.Logf("%s: survey: %s passes (%v)", p.name, test, took)
			}
		case p.m == nil: // the control
			if failed {
				t.Errorf("%s fails on the unmutated code:\n%s", test, out)
			} else {
				t.Logf("%s: %s passes (%v)", p.name, test, took)
			}
		case !failed:
			t.Errorf("%s passed with the mutant %s (%s): the property does not catch it", test, p.name, p.m.about)
		default:
			frags := strings.Split(want, "|")
			if line := failureLine(out, frags); line != "" {
				t.Logf("%s: caught by %s in %v: %s", p.name, test, took, line)
			} else {
				t.Errorf("%s failed with the mutant %s, but not for the expected reason %q:\n%s", test, p.name, want, out)
			}
		}
	}
}

func mapKeys(m map[string]string) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// runMutantProperty runs one property test in a test binary and reports
// whether it failed, and whether it ran out of time.
func runMutantProperty(ctx context.Context, t *testing.T, bin, dir, name, test string, limit time.Duration) (out string, failed, timedOut bool) {
	cmd := exec.CommandContext(ctx, bin,
		"-test.run", "^("+test+")$", "-test.count=1", "-test.timeout="+limit.String(),
		"-rapid.checks="+mutantChecks, "-rapid.nofailfile")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), mutantEnv+"="+name)
	b, err := cmd.CombinedOutput()
	out = string(b)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return out, false, false
	case errors.As(err, &exit):
		if ctx.Err() != nil {
			t.Fatalf("out of time (%v for everything) running %s: %v", mutantTotal, test, ctx.Err())
		}
		return out, true, strings.Contains(out, "panic: test timed out")
	default:
		t.Fatalf("running %s: %v\n%s", test, err, out)
		return "", false, false
	}
}

// failureLine returns the first line of out that holds one of frags, or,
// with no frags, the first line that looks like a property's failure.
func failureLine(out string, frags []string) string {
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		if frags == nil {
			if strings.Contains(line, "_test.go:") && !strings.Contains(line, "[rapid]") {
				return line
			}
			continue
		}
		for _, f := range frags {
			if f != "" && strings.Contains(line, f) {
				return line
			}
		}
	}
	if frags == nil {
		line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
		return line
	}
	return ""
}
