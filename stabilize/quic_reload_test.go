package stabilize

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestQUICReloadReleasesRemovedListener: a reload that moves the
// terminating handler to another listener releases the transport of the
// listener it no longer has: that transport's connections end, and their
// backend connections with them, rather than living on in a handler that
// does not listen there.
func TestQUICReloadReleasesRemovedListener(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, lb, c := startQUICRelay(t, network)
		mustExchange(t, c, []byte("before"))
		moved := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		if err := caddy.Load(testConfigOn(network, moved, "", 30*time.Second, quicHandler(t, "", "", nil, a.dial())), true); err != nil {
			t.Fatal(err)
		}
		c2 := dialQUIC(t, moved, nil, quicClientTLS(t))
		if got := mustExchange(t, c2, []byte("moved")); got != "a" {
			t.Fatalf("reply from %q through the new listener", got)
		}
		eventually(t, 5*time.Second, "the removed listener's connection to end at the backend", func() bool {
			return a.live.Load() == 1
		})
		if refs, ok := quicTransports.References(network + "/" + lb.addr); ok {
			t.Fatalf("the removed listener's transport has %d references", refs)
		}
	})
}

// TestQUICReloadTurnsOnTermination: a reload that adds QUIC termination to
// a handler of the same granularity, policy and upstreams does not hand it
// the old handler's flows, which would go on being balanced raw; a
// client's next datagram goes to the new handler's QUIC transport, and
// QUIC clients are served.
func TestQUICReloadTurnsOnTermination(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		raw := startUpstream(t, "raw")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "round_robin", raw))
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("before")
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, PerFlow, "round_robin", nil, raw.dial())), true); err != nil {
			t.Fatal(err)
		}
		if name, _, err := cl.roundTrip([]byte("after"), 500*time.Millisecond); err == nil {
			t.Fatalf("a raw datagram after the reload was balanced to %q", name)
		}
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		if got := mustExchange(t, c, []byte("quic")); got != "raw" {
			t.Fatalf("reply from %q", got)
		}
	})
}
