package sockfsm

import (
	"log/slog"
	"sync"
	"unsafe"
	"weak"

	"github.com/sockfsm/sockfsm/fsm"
)

// shared is what every connection of one Config has in common: the
// limits computed from it, its hooks and its logger. Engine.Init finds it
// in sharedCache, so that connections of the same Config hold one pointer
// to it instead of a copy each (docs/performance.md, "Memory model").
type shared struct {
	lim      limits
	onChange func(ConnInfo, fsm.State, fsm.State, fsm.Event)
	onClose  func(ConnInfo, CloseInfo)
	log      *slog.Logger // nil logs nothing
}

// sharedKey identifies a shared: the limits by value, the logger and the
// hooks by identity (the address of the logger, and of each func value's
// closure). An address is a sound key only while its object is alive: the
// cache holds its shared weakly, and a live shared holds the logger and the
// hooks, so an entry whose shared is alive names those very objects; once
// its shared is collected (weak.Pointer.Value returns nil), the entry is
// rebuilt, whatever now lives at those addresses.
type sharedKey struct {
	lim               limits
	log               uintptr
	onChange, onClose uintptr
}

// maxShared bounds sharedCache: a program that builds Configs without end
// (a new hook closure per connection) gets a shared of its own for each
// connection beyond it, as before the cache.
const maxShared = 64

// sharedCache maps keys to live shareds.
var sharedCache struct {
	mu sync.Mutex
	m  map[sharedKey]weak.Pointer[shared]
}

// funcAddr returns the address of f's closure, zero for nil: a func value
// is a pointer to its closure.
func funcAddr[F any](f F) uintptr { return *(*uintptr)(unsafe.Pointer(&f)) }

// sharedFor returns the shared of the Config cfg, whose limits are lim and
// whose logger (with its default applied) is log.
func sharedFor(lim limits, cfg *Config, log *slog.Logger) *shared {
	k := sharedKey{lim, uintptr(unsafe.Pointer(log)), funcAddr(cfg.OnStateChange), funcAddr(cfg.OnClose)}
	c := &sharedCache
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.m[k].Value(); s != nil {
		return s
	}
	s := &shared{lim: lim, onChange: cfg.OnStateChange, onClose: cfg.OnClose, log: log}
	if c.m == nil {
		c.m = make(map[sharedKey]weak.Pointer[shared])
	}
	if len(c.m) >= maxShared {
		for k, w := range c.m {
			if w.Value() == nil {
				delete(c.m, k)
			}
		}
		if len(c.m) >= maxShared {
			return s
		}
	}
	c.m[k] = weak.Make(s)
	return s
}
