package loop

// timerHeap is a loop's timers: a binary min-heap of deadlines, one entry
// at most per connection, which keeps its entry's index (plus one; zero for
// none) in conn.ti. Deadlines are nanoseconds on the loop's monotonic clock.
type timerHeap []timerEntry

type timerEntry struct {
	at int64
	c  *conn
}

// set arms c's entry at at: it adds one, or moves the one c has.
func (h *timerHeap) set(c *conn, at int64) {
	if c.ti == 0 {
		*h = append(*h, timerEntry{at, c})
		i := len(*h) - 1
		c.ti = int32(i + 1)
		h.up(i)
		return
	}
	i := int(c.ti - 1)
	old := (*h)[i].at
	(*h)[i].at = at
	if at < old {
		h.up(i)
	} else {
		h.down(i)
	}
}

// remove removes c's entry, if it has one.
func (h *timerHeap) remove(c *conn) {
	if c.ti == 0 {
		return
	}
	i := int(c.ti - 1)
	last := len(*h) - 1
	if i != last {
		h.swap(i, last)
	}
	(*h)[last] = timerEntry{}
	*h = (*h)[:last]
	c.ti = 0
	if i != last {
		h.down(i)
		h.up(i)
	}
	// Give memory back after a burst of connections has gone.
	if cap(*h) > 1024 && len(*h) < cap(*h)/4 {
		*h = append(timerHeap(nil), *h...)
	}
}

// at returns the entry of c, or 0 if it has none.
func (h timerHeap) at(c *conn) int64 {
	if c.ti == 0 {
		return 0
	}
	return h[c.ti-1].at
}

func (h timerHeap) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].c.ti = int32(i + 1)
	h[j].c.ti = int32(j + 1)
}

func (h timerHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if h[p].at <= h[i].at {
			return
		}
		h.swap(i, p)
		i = p
	}
}

func (h timerHeap) down(i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		m := l
		if r := l + 1; r < n && h[r].at < h[l].at {
			m = r
		}
		if h[i].at <= h[m].at {
			return
		}
		h.swap(i, m)
		i = m
	}
}
