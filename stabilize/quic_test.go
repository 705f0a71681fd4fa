package stabilize

import (
	"crypto/rand"
	"fmt"
	"testing"
	"time"

)

// TestQUICRoundRobin: 30 client connections over 3 quic/ backends are
// spread 10/10/10, each connection staying on its backend.
func TestQUICRoundRobin(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		bs := []*quicBackend{startQUICBackend(t, "a"), startQUICBackend(t, "b"), startQUICBackend(t, "c")}
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, "", "round_robin", nil, bs[0].dial(), bs[1].dial(), bs[2].dial()))
		got := map[string]int{}
		for i := range 30 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			first := mustExchange(t, c, []byte(fmt.Sprint("hello ", i)))
			if again := mustExchange(t, c, []byte("again")); again != first {
				t.Fatalf("connection %d moved from %s to %s", i, first, again)
			}
			got[first]++
			_ = c.CloseWithError(0, "")
		}
		for _, b := range bs {
			if got[b.name] != 10 {
				t.Fatalf("connections per backend: %v, want 10 each", got)
			}
		}
	})
}

// TestQUICUDPUpstreams: with udp/ upstreams each stream is one request
// datagram; per packet, 30 requests on one connection give exact thirds.
func TestQUICUDPUpstreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		us := []*testUpstream{startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")}
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, PerPacket, "round_robin", nil, us[0].dial(), us[1].dial(), us[2].dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		got := map[string]int{}
		for i := range 30 {
			got[mustExchange(t, c, []byte(fmt.Sprint("request ", i)))]++
		}
		for _, u := range us {
			if got[u.name] != 10 {
				t.Fatalf("requests per upstream: %v, want 10 each", got)
			}
		}
	})
}

// TestQUICRelaySizes relays bidirectional streams of 1 byte to 1 MiB both
// ways.
func TestQUICRelaySizes(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, b.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		for _, n := range []int{1, 100, 1200, 1500, 64 << 10, 1 << 20} {
			data := make([]byte, n)
			_, _ = rand.Read(data)
			if name := mustExchange(t, c, data); name != "a" {
				t.Fatalf("reply from %q", name)
			}
		}
	})
}
