package sockfsm

import (
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestOnMaxConnsWait: an accept loop that finds every MaxConns slot taken
// reports how long it waited once a slot frees, once the server shuts
// down, or once its Listener closes; one that finds a slot free reports nothing. On synctest's clock,
// so the reported waits are exact and nothing depends on scheduling.
func TestOnMaxConnsWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var waits []time.Duration
		s := &Server{Config: Config{MaxConns: 1, OnMaxConnsWait: func(d time.Duration) {
			mu.Lock()
			waits = append(waits, d)
			mu.Unlock()
		}}}
		s.mu.Lock()
		s.initLocked()
		s.mu.Unlock()

		if !s.acquire(nil) { // the slot is free: no wait
			t.Fatal("acquire with a free slot failed")
		}
		got := make(chan bool, 1)
		go func() { got <- s.acquire(nil) }()
		synctest.Wait() // blocked at MaxConns
		time.Sleep(3 * time.Second)
		s.release()
		if !<-got {
			t.Fatal("acquire gave up with a slot freed")
		}

		go func() { got <- s.acquire(nil) }()
		synctest.Wait()
		time.Sleep(time.Second)
		s.mu.Lock()
		s.stopLocked() // shutting down
		s.mu.Unlock()
		if <-got {
			t.Fatal("acquire took a slot none freed")
		}

		// Listener.Accept's wait also ends when its Listener closes.
		l := &Server{Config: s.Config}
		l.mu.Lock()
		l.initLocked()
		l.mu.Unlock()
		l.sem <- struct{}{}
		stop := make(chan struct{})
		go func() { got <- l.acquire(stop) }()
		synctest.Wait()
		time.Sleep(2 * time.Second)
		close(stop)
		if <-got {
			t.Fatal("acquire took a slot none freed")
		}

		mu.Lock()
		defer mu.Unlock()
		want := []time.Duration{3 * time.Second, time.Second, 2 * time.Second}
		if len(waits) != len(want) {
			t.Fatalf("OnMaxConnsWait heard %v, want %v", waits, want)
		}
		for i := range want {
			if waits[i] != want[i] {
				t.Errorf("OnMaxConnsWait heard %v, want %v", waits, want)
			}
		}
	})
}
