package main

import (
	"math/bits"
	"sync"
	"time"
)

// subBits is the number of bits of precision kept per power of two in hist:
// a recorded value is off by at most 1/2^(subBits+1) of itself (0.4%).
const subBits = 7

// maxExp bounds the exponents hist keeps: values up to 2^(maxExp+subBits+1)
// ns (about 137 s) are kept exactly to that precision, larger ones clamp.
const maxExp = 29

const numBuckets = 1<<subBits + (maxExp+1)<<subBits

// hist is a log-linear latency histogram in nanoseconds, in the manner of
// HdrHistogram: values below 2^subBits are exact; above, each power of two is
// split into 2^subBits buckets. It is not safe for concurrent use; see
// shardedHist.
type hist struct {
	counts [numBuckets]uint32
	n      uint64
	max    time.Duration
}

func bucketOf(v uint64) int {
	if v < 1<<subBits {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1 // v>>e is in [2^subBits, 2^(subBits+1))
	if e > maxExp {
		return numBuckets - 1
	}
	return 1<<subBits + e<<subBits + int(v>>e) - 1<<subBits
}

// bucketMid returns the middle of bucket i's range of values.
func bucketMid(i int) uint64 {
	if i < 1<<subBits {
		return uint64(i)
	}
	e := (i - 1<<subBits) >> subBits
	m := uint64(i-1<<subBits-e<<subBits) + 1<<subBits
	lo := m << e
	return lo + (uint64(1)<<e)/2
}

func (h *hist) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d))]++
	h.n++
	if d > h.max {
		h.max = d
	}
}

func (h *hist) merge(o *hist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	if o.max > h.max {
		h.max = o.max
	}
}

// quantile returns the value at quantile q (0 < q <= 1), or 0 if h is
// empty. The largest value is exact.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.999999)
	if rank < 1 {
		rank = 1
	}
	if rank >= h.n {
		return h.max
	}
	var seen uint64
	for i, c := range h.counts {
		seen += uint64(c)
		if seen >= rank {
			return min(time.Duration(bucketMid(i)), h.max)
		}
	}
	return h.max
}

// shardedHist spreads concurrent recording over a few locked histograms.
type shardedHist struct {
	shards []histShard
}

type histShard struct {
	mu sync.Mutex
	h  hist
}

func newShardedHist(n int) *shardedHist {
	return &shardedHist{shards: make([]histShard, max(1, min(n, 32)))}
}

// record adds d to the shard of worker w.
func (s *shardedHist) record(w int, d time.Duration) {
	sh := &s.shards[w%len(s.shards)]
	sh.mu.Lock()
	sh.h.record(d)
	sh.mu.Unlock()
}

// total merges every shard.
func (s *shardedHist) total() *hist {
	var t hist
	for i := range s.shards {
		s.shards[i].mu.Lock()
		t.merge(&s.shards[i].h)
		s.shards[i].mu.Unlock()
	}
	return &t
}
