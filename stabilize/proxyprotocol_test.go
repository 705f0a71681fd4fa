package stabilize

import (
	"bufio"
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

func TestProxyProtocolV2(t *testing.T) {
	up := startUpstream(t, "a")
	h := handlerConfig("flow", "", up)
	h["proxy_protocol"] = "v2"
	lb := startBalancer(t, false, 30*time.Second, h)

	cl := newClient(t, lb.addr)
	if _, err := cl.conn.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "the upstream to receive the datagram", func() bool { return up.got.Load() == 1 })
	up.mu.Lock()
	datagram := append([]byte(nil), up.last...)
	up.mu.Unlock()

	r := bufio.NewReader(bytes.NewReader(datagram))
	hdr, err := proxyproto.Read(r)
	if err != nil {
		t.Fatalf("go-proxyproto cannot parse %q: %v", datagram, err)
	}
	if hdr.Version != 2 || hdr.TransportProtocol != proxyproto.UDPv4 {
		t.Fatalf("header version %d, protocol %v; want 2 over UDPv4", hdr.Version, hdr.TransportProtocol)
	}
	want := cl.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	if got := hdr.SourceAddr.(*net.UDPAddr).AddrPort(); got != want {
		t.Fatalf("PROXY source %v, want the client's %v", got, want)
	}
	if dst := hdr.DestinationAddr.(*net.UDPAddr).AddrPort(); dst.String() != lb.addr {
		t.Fatalf("PROXY destination %v, want the listener %v", dst, lb.addr)
	}
	rest := make([]byte, 64)
	n, _ := r.Read(rest)
	if string(rest[:n]) != "hello" {
		t.Fatalf("payload after the header is %q", rest[:n])
	}
}

func TestProxyV2IPv6AndMixed(t *testing.T) {
	for _, tc := range []struct{ src, dst string }{
		{"[2001:db8::1]:4000", "[2001:db8::2]:5000"},
		{"10.0.0.1:4000", "[::]:5000"},
	} {
		b := appendProxyV2(nil, netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst))
		hdr, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
		if err != nil {
			t.Fatalf("%s -> %s: %v", tc.src, tc.dst, err)
		}
		if hdr.TransportProtocol != proxyproto.UDPv6 {
			t.Errorf("%s -> %s: protocol %v, want UDPv6", tc.src, tc.dst, hdr.TransportProtocol)
		}
		if got := hdr.SourceAddr.(*net.UDPAddr).AddrPort(); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()).String() != tc.src {
			t.Errorf("source %v, want %s", got, tc.src)
		}
	}
}
