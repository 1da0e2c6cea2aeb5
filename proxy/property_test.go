package proxy_test

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"pgregory.net/rapid"

	"github.com/sockfsm/sockfsm/proxy"
)

// TestPreludeReadsExactlyTheHeader: whatever header go-proxyproto writes
// (v1 or v2, IPv4 or IPv6, with TLVs or not), however the bytes are cut
// into segments, and whatever data follows at once, the prelude returns
// the header's client address and leaves every byte of the data, in order,
// to be read from the connection it returns.
func TestPreludeReadsExactlyTheHeader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	prelude := proxy.Prelude(proxy.Required)
	rapid.Check(t, func(rt *rapid.T) {
		version := rapid.SampledFrom([]byte{1, 2}).Draw(rt, "version")
		v6 := rapid.Bool().Draw(rt, "v6")
		// The shortest lines ("PROXY TCP6 :: :: 1 1\r\n") as often as long
		// ones: a read past a header's end by a byte or two shows only on a
		// header as short as the grammar allows.
		shape := rapid.SampledFrom([]string{"minimal", "short", "random"}).Draw(rt, "shape")
		addr := func(label string) *net.TCPAddr {
			var ip netip.Addr
			port := rapid.IntRange(1, 9).Draw(rt, label+" port")
			switch {
			case shape == "minimal" && v6:
				ip = netip.IPv6Unspecified()
			case shape == "minimal":
				ip = netip.IPv4Unspecified()
			case shape == "short" && v6:
				ip = netip.MustParseAddr(rapid.SampledFrom([]string{"::1", "1::", "2001:db8::1"}).Draw(rt, label))
			case shape == "short":
				ip = netip.MustParseAddr(rapid.SampledFrom([]string{"1.2.3.4", "10.0.0.1"}).Draw(rt, label))
			case v6:
				ip = netip.AddrFrom16([16]byte(rapid.SliceOfN(rapid.Byte(), 16, 16).Draw(rt, label)))
				if ip.Is4In6() {
					ip = netip.MustParseAddr("2001:db8::1")
				}
			default:
				ip = netip.AddrFrom4([4]byte(rapid.SliceOfN(rapid.Byte(), 4, 4).Draw(rt, label)))
			}
			if shape == "random" {
				port = rapid.IntRange(1, 65535).Draw(rt, label+" port")
			}
			return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port)))
		}
		src, dst := addr("src"), addr("dst")
		tp := proxyproto.TCPv4
		if v6 {
			tp = proxyproto.TCPv6
		}
		h := &proxyproto.Header{Version: version, Command: proxyproto.PROXY, TransportProtocol: tp, SourceAddr: src, DestinationAddr: dst}
		if version == 2 && rapid.Bool().Draw(rt, "tlv") {
			v := rapid.SliceOfN(rapid.Byte(), 0, 300).Draw(rt, "tlv value")
			if err := h.SetTLVs([]proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: v}}); err != nil {
				rt.Fatal(err)
			}
		}
		hdr, err := h.Format()
		if err != nil {
			rt.Fatal(err)
		}
		// Data that may itself look like a header.
		data := rapid.OneOf(
			rapid.SliceOfN(rapid.Byte(), 0, 2000),
			rapid.Just(append([]byte(nil), hdr...)),
			rapid.Just([]byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")),
		).Draw(rt, "data")
		wire := append(append([]byte(nil), hdr...), data...)
		cuts := rapid.SliceOfN(rapid.IntRange(1, len(wire)), 0, 5).Draw(rt, "cuts")

		c, err := net.DialTimeout("tcp", ln.Addr().String(), deadline)
		if err != nil {
			rt.Fatal(err)
		}
		defer c.Close()
		sc, err := ln.Accept()
		if err != nil {
			rt.Fatal(err)
		}
		defer sc.Close()
		sc.SetDeadline(time.Now().Add(deadline))
		go func() {
			rest := wire
			for _, n := range cuts {
				n = min(n, len(rest))
				c.Write(rest[:n])
				rest = rest[n:]
				time.Sleep(100 * time.Microsecond)
			}
			c.Write(rest)
			c.(*net.TCPConn).CloseWrite()
		}()
		nc, err := prelude(sc)
		if err != nil {
			rt.Fatalf("prelude: %v (header %q)", err, hdr)
		}
		if nc.RemoteAddr().String() != src.String() || nc.LocalAddr().String() != dst.String() {
			rt.Fatalf("addresses %v -> %v, want %v -> %v", nc.RemoteAddr(), nc.LocalAddr(), src, dst)
		}
		got, err := io.ReadAll(nc)
		if err != nil {
			rt.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			rt.Fatalf("read %d bytes after the header, want the %d sent (first difference shows a read-ahead or a short read)", len(got), len(data))
		}
	})
}
