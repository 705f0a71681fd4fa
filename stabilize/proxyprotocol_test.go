package stabilize

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// TestProxyProtocolV2 checks every datagram the upstream receives with
// go-proxyproto: each carries a v2 header with the client's address and the
// listener's, then exactly the client's payload. That includes empty
// datagrams, the longest datagram the listener forwards, and on fastudp/ the
// datagrams that bypass caddy-l4 once the flow is established and those sent
// after the hand-off (fastHandoff), when Handle has returned.
func TestProxyProtocolV2(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		up := startRawUpstream(t, false, true)
		h := rawHandler(per, up)
		h["proxy_protocol"] = "v2"
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		cl := newClient(t, lb.addr)
		client := cl.conn.LocalAddr().(*net.UDPAddr).AddrPort()

		sent := 0
		send := func(payload string) {
			t.Helper()
			if _, err := cl.conn.Write([]byte(payload)); err != nil {
				t.Fatal(err)
			}
			sent++
			eventually(t, 2*time.Second, fmt.Sprintf("the upstream to receive datagram %d", sent), func() bool {
				return up.got.Load() >= int64(sent)
			})
			datagram := up.recorded()[sent-1]
			if err := checkProxyV2(datagram, client, lb.addr, payload); err != nil {
				t.Errorf("datagram %d (%d bytes): %v", sent, len(payload), err)
			}
		}
		for _, p := range []string{"hello", "", "second", ""} {
			send(p)
		}
		time.Sleep(fastHandoff + 300*time.Millisecond)
		// The longest datagram the listener forwards, with its header.
		for _, p := range []string{"after-handoff", "", strings.Repeat("p", maxForwarded(network)), "last"} {
			send(p)
		}
		if got := up.got.Load(); got != int64(sent) {
			t.Errorf("the upstream received %d datagrams, sent %d", got, sent)
		}
	})
}

// checkProxyV2 parses datagram with go-proxyproto and checks its header
// names src and dst over UDP, and that payload follows it.
func checkProxyV2(datagram []byte, src netip.AddrPort, dst, payload string) error {
	r := bufio.NewReader(bytes.NewReader(datagram))
	hdr, err := proxyproto.Read(r)
	if err != nil {
		return fmt.Errorf("go-proxyproto cannot parse %q: %w", datagram[:min(len(datagram), 64)], err)
	}
	if hdr.Version != 2 || hdr.TransportProtocol != proxyproto.UDPv4 {
		return fmt.Errorf("header version %d, protocol %v; want 2 over UDPv4", hdr.Version, hdr.TransportProtocol)
	}
	if got := hdr.SourceAddr.(*net.UDPAddr).AddrPort(); got != src {
		return fmt.Errorf("PROXY source %v, want the client's %v", got, src)
	}
	if got := hdr.DestinationAddr.(*net.UDPAddr).AddrPort(); got.String() != dst {
		return fmt.Errorf("PROXY destination %v, want the listener %v", got, dst)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != payload {
		return fmt.Errorf("the %d bytes after the header differ from the %d-byte payload", len(rest), len(payload))
	}
	return nil
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
