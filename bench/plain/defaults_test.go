package plain_test

import (
	"testing"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/bench/plain"
)

// TestDefaultsMatchSockfsm keeps the comparison fair: the plain server's
// bounds are sockfsm's. (plain cannot import sockfsm: sockfsm's benchmarks
// import plain.)
func TestDefaultsMatchSockfsm(t *testing.T) {
	pairs := []struct {
		name        string
		plain, want int64
	}{
		{"IdleTimeout", int64(plain.DefaultIdleTimeout), int64(sockfsm.DefaultIdleTimeout)},
		{"WriteTimeout", int64(plain.DefaultWriteTimeout), int64(sockfsm.DefaultWriteTimeout)},
		{"LingerTimeout", int64(plain.DefaultLingerTimeout), int64(sockfsm.DefaultLingerTimeout)},
		{"LingerTime", int64(plain.DefaultLingerTime), int64(sockfsm.DefaultLingerTime)},
		{"LingerBytes", plain.DefaultLingerBytes, sockfsm.DefaultLingerBytes},
		{"BufferSize", plain.DefaultBufferSize, sockfsm.DefaultReadBufferSize},
	}
	for _, p := range pairs {
		if p.plain != p.want {
			t.Errorf("plain.Default%s = %d, sockfsm's is %d", p.name, p.plain, p.want)
		}
	}
}
