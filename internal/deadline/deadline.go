// Package deadline is the read or write deadline of an in-memory
// connection (transport.Pipe, the net.Conn face of sockfsm's Listener): a
// timer made once and re-armed, that broadcasts on the connection's
// sync.Cond when it passes, so that a call blocked on the Cond returns.
package deadline

import (
	"sync"
	"time"
)

// Deadline is one deadline, guarded by the connection's mutex (the Cond's
// Locker). Its timer is made on first use and re-armed with Reset, so that
// setting a deadline, which a server does on every read, does not allocate.
// The zero value has no deadline.
type Deadline struct {
	cond    *sync.Cond
	timer   *time.Timer // made on first use; armed while when is in the future
	when    time.Time   // the armed expiry, or zero
	expired bool
}

// Set arms d to expire at t; the zero t disarms it, a t in the past expires
// it at once. cond is the connection's Cond, broadcast on every change; its
// Locker must be held.
func (d *Deadline) Set(cond *sync.Cond, t time.Time) {
	if d.timer == nil {
		d.cond = cond // before the timer exists: fire reads it without the lock
	}
	d.expired = false
	d.when = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
	if !t.IsZero() {
		if dur := time.Until(t); dur > 0 {
			d.when = t
			if d.timer == nil {
				d.timer = time.AfterFunc(dur, d.fire)
			} else {
				d.timer.Reset(dur)
			}
		} else {
			d.expired = true
		}
	}
	cond.Broadcast()
}

// Expired reports whether d has passed. The Cond's Locker must be held.
func (d *Deadline) Expired() bool { return d.expired }

// Stop disarms d for good; the Cond's Locker must be held.
func (d *Deadline) Stop() {
	d.when = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
}

// fire expires d if its armed time has come. A firing of an earlier arming
// that started before Stop (it cannot be recalled) finds no expiry, or one
// still in the future, for which it re-arms the timer (as it does if the
// clock reads a little early).
func (d *Deadline) fire() {
	d.cond.L.Lock()
	defer d.cond.L.Unlock()
	if d.when.IsZero() {
		return
	}
	if left := time.Until(d.when); left > 0 {
		d.timer.Reset(left)
		return
	}
	d.when = time.Time{}
	d.expired = true
	d.cond.Broadcast()
}
