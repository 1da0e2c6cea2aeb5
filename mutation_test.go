//go:build sockfsm_mutate

package sockfsm

// The properties bite: each test-only mutation of the engine (mutate.go)
// breaks one promise, and the property for that promise must fail. Run with
//
//	go test -tags sockfsm_mutate -run Mutation .

import (
	"flag"
	"fmt"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// failTB is a rapid.TB that records a failure instead of failing the test.
type failTB struct {
	name   string
	failed bool
	log    strings.Builder
}

type failNow struct{}

func (f *failTB) Helper()                           {}
func (f *failTB) Name() string                      { return f.name }
func (f *failTB) Logf(format string, args ...any)   { fmt.Fprintf(&f.log, format+"\n", args...) }
func (f *failTB) Log(args ...any)                   { fmt.Fprintln(&f.log, args...) }
func (f *failTB) Skipf(format string, args ...any)  { f.Logf(format, args...) }
func (f *failTB) Skip(args ...any)                  { f.Log(args...) }
func (f *failTB) SkipNow()                          {}
func (f *failTB) Errorf(format string, args ...any) { f.Logf(format, args...); f.failed = true }
func (f *failTB) Error(args ...any)                 { f.Log(args...); f.failed = true }
func (f *failTB) Fatalf(format string, args ...any) { f.Errorf(format, args...); panic(failNow{}) }
func (f *failTB) Fatal(args ...any)                 { f.Error(args...); panic(failNow{}) }
func (f *failTB) FailNow()                          { f.failed = true; panic(failNow{}) }
func (f *failTB) Fail()                             { f.failed = true }
func (f *failTB) Failed() bool                      { return f.failed }

// setFlag sets a rapid flag for the test and restores it after.
func setFlag(t *testing.T, name, value string) {
	fl := flag.Lookup(name)
	old := fl.Value.String()
	if err := fl.Value.Set(value); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fl.Value.Set(old) })
}

func TestMutationsAreCaught(t *testing.T) {
	setFlag(t, "rapid.nofailfile", "true")
	setFlag(t, "rapid.checks", "2000")
	cases := []struct {
		name string
		mut  mutation
		prop func(*rapid.T)
		want string // fragments of the failure message, any of them, separated by |
	}{
		{"skip flush before half-close", mutSkipFlush, propEchoIsExact, "received"},
		{"write after half-close", mutWriteAfterFIN, propNoSendAfterShutdown, "after our half-close"},
		{"skip lingering", mutSkipLinger, propEveryConnectionClosed, "unread input"},
		{"no idle timeout", mutNoIdleTimeout, propEveryConnectionClosed, "no deadline|bound is"},
		{"no write timeout", mutNoWriteTimeout, propEveryConnectionClosed, "no deadline|bound is"},
		{"no linger time", mutNoLingerTime, propEveryConnectionClosed, "no deadline|bound is|livelock"},
		{"close twice", mutCloseTwice, propEveryConnectionClosed, "closed 2 times"},
		{"notify twice", mutNotifyTwice, propEveryConnectionClosed, "OnClose called 2 times"},
		{"ignore the peer's FIN", mutIgnorePeerFIN, propOnlyTableEdges, "illegal transition"},
		// The model-based test catches them too.
		{"state machine: write after half-close", mutWriteAfterFIN, propStateMachine, "writes after our half-close"},
		{"state machine: no idle timeout", mutNoIdleTimeout, propStateMachine, "no deadline|bound is"},
		{"state machine: no write timeout", mutNoWriteTimeout, propStateMachine, "no deadline|bound is"},
		{"state machine: close twice", mutCloseTwice, propStateMachine, "closed 2 times"},
		{"state machine: notify twice", mutNotifyTwice, propStateMachine, "OnClose 2 times"},
		{"state machine: ignore the peer's FIN", mutIgnorePeerFIN, propStateMachine, "engine bug"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			testMutation = c.mut
			defer func() { testMutation = 0 }()
			ft := &failTB{name: t.Name()}
			func() {
				defer func() {
					if r := recover(); r != nil {
						if _, ok := r.(failNow); !ok {
							panic(r)
						}
					}
				}()
				rapid.Check(ft, c.prop)
			}()
			if !ft.failed {
				t.Fatalf("the property passed with the mutation %q", c.name)
			}
			if !containsAny(ft.log.String(), strings.Split(c.want, "|")) {
				t.Fatalf("the property failed, but not for the expected reason %q:\n%s", c.want, ft.log.String())
			}
			line, _, _ := strings.Cut(ft.log.String(), "\n")
			t.Logf("caught: %s", line)
		})
	}
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
