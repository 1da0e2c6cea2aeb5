package sockfsm

import (
	"testing"
	"unsafe"
)

// The memory budgets of an idle connection's structures
// (docs/performance.md, "Memory model"). A size is not a timing: these
// fail only when a field is added or widened, and then the budget, the
// memory model and the reason are revisited together.
const (
	// engineBudget is the Engine's size: 544 B before it was trimmed
	// (2026-12-01), 272 B after.
	engineBudget = 272
	// driverBudget is the goroutine driver's per-connection struct, which
	// embeds the Engine: a size class of its own (576 B; 896 B before).
	driverBudget = 576
)

// TestEngineSize fails if the Engine, or the goroutine driver's struct
// that embeds it, grows beyond its budget.
func TestEngineSize(t *testing.T) {
	if n := unsafe.Sizeof(Engine{}); n > engineBudget {
		t.Errorf("unsafe.Sizeof(Engine{}) = %d B, over its budget of %d B: an idle connection pays for every byte (docs/performance.md, \"Memory model\")", n, engineBudget)
	}
	if n := unsafe.Sizeof(driver{}); n > driverBudget {
		t.Errorf("unsafe.Sizeof(driver{}) = %d B, over its budget of %d B", n, driverBudget)
	}
	// What every connection of a Config shares, and what few use, stays
	// out of the Engine: one pointer each.
	if n := unsafe.Sizeof(shared{}); n < unsafe.Sizeof(limits{}) {
		t.Errorf("shared is %d B, smaller than the limits it holds", n)
	}
}

// TestSharedPerConfig: the connections of one Config share one shared
// (limits, hooks, logger); a Config that differs in a limit, a hook or the
// logger gets its own, and the one it was given is not another's.
func TestSharedPerConfig(t *testing.T) {
	hook := func(ConnInfo, CloseInfo) {}
	other := func(ConnInfo, CloseInfo) {}
	cfg := Config{IdleTimeout: 7e9, OnClose: hook, Logger: testCfg.Logger}
	a, b := newTestEngine(t, cfg, Echo{}), newTestEngine(t, cfg, Echo{})
	if a.sh != b.sh {
		t.Error("two engines of one Config do not share its limits")
	}
	for _, c := range []Config{
		{IdleTimeout: 8e9, OnClose: hook, Logger: testCfg.Logger},
		{IdleTimeout: 7e9, OnClose: other, Logger: testCfg.Logger},
		{IdleTimeout: 7e9, OnClose: hook},
	} {
		e := newTestEngine(t, c, Echo{})
		if e.sh == a.sh {
			t.Errorf("Config %+v shares the shared of %+v", c, cfg)
		}
		if e.sh.lim != c.limits() || funcAddr(e.sh.onClose) != funcAddr(c.OnClose) {
			t.Errorf("Config %+v got limits %+v", c, e.sh.lim)
		}
	}
}
