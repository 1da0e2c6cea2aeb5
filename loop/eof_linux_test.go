package loop

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/internal/conntest"
)

// TestUnixDescriptorsMidRequest: on a Unix socket a read ends early at a
// message that carries descriptors (SCM_RIGHTS), so a short read there
// does not mean the input is all read, even after the peer's shutdown:
// the loop must read on to the peer's EOF (the zero read it saves on TCP,
// see fCleanFIN, it cannot save here). The client gets the whole echo and
// EOF, never ECONNRESET, which closing with input unread would give it.
func TestUnixDescriptorsMidRequest(t *testing.T) {
	checkFDs(t)
	gated, release := conntest.GatedEcho(t)
	ts := startServer(t, "unix", filepath.Join(t.TempDir(), "s"), 1, sockfsm.Config{}, gated)
	c := ts.dial(t).(*net.UnixConn)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	conntest.MustWrite(t, c, []byte("this is "))
	// A Unix stream write lands in the server's socket before it returns.
	if _, _, err := c.WriteMsgUnix([]byte("a "), unix.UnixRights(int(f.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	conntest.MustWrite(t, c, []byte("test"))
	conntest.CloseWrite(t, c)
	release()
	const want = "this is a test"
	if got := conntest.ReadToEOF(t, c); string(got) != want {
		t.Fatalf("echo = %q, want %q then EOF", got, want)
	}
	info := ts.rec.wait(t, conntest.Key(c))
	conntest.CheckInfo(t, info, conntest.WantInfo{Reason: sockfsm.ReasonPeerClosed, PeerFIN: true,
		BytesRead: int64(len(want)), BytesWritten: int64(len(want))})
}
