package stabilize

import (
	"fmt"
	"runtime"
	"strings"
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

// TestQUICReloadEndsHandleAtOnce: a reload wakes every Handle of the old
// terminating handler, and the fastudp hand-off deadline that a Handle
// sets as it begins, or after each datagram, does not override the wake:
// none of them waits on for the hand-off's two seconds. Under a flood of
// new clients some Handle calls are still setting up when the reload wakes
// them (their registration with the socket waits behind others'), so the
// test follows each one that waits for a datagram after the wake.
func TestQUICReloadEndsHandleAtOnce(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		defer newClientsFlood(t, lb.addr, 2)() // a Handle starts for each
		for i := range 3 {
			time.Sleep(300 * time.Millisecond)
			old := tr.latest()
			if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "", nil, a.dial())), true); err != nil {
				t.Fatal(err)
			}
			reading := func() int {
				old.quicHeld.mu.Lock()
				defer old.quicHeld.mu.Unlock()
				return len(old.quicHeld.flows)
			}
			waiting := make(map[string]time.Time) // since when each Handle waits
			for deadline := time.Now().Add(10 * time.Second); reading() > 0; {
				now := time.Now()
				if now.After(deadline) {
					t.Fatalf("reload %d: %d flows still read by the old handler", i+1, reading())
				}
				for _, id := range quicHandlesWaiting(old) {
					since, ok := waiting[id]
					if !ok {
						waiting[id] = now
					} else if now.Sub(since) > fastHandoff/2 {
						t.Fatalf("reload %d: a Handle of the old handler waits for a datagram %v after the wake",
							i+1, now.Sub(since).Round(time.Millisecond))
					}
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
}

// quicHandlesWaiting returns the goroutine IDs of h's handleQUIC calls that
// wait in caddy-l4's read for a datagram.
func quicHandlesWaiting(h *Handler) []string {
	buf := make([]byte, 64<<20)
	buf = buf[:runtime.Stack(buf, true)]
	recv := fmt.Sprintf("handleQUIC(%p,", h)
	var ids []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, recv) && strings.Contains(g, "layer4.(*packetConn).Read(") {
			id, _, _ := strings.Cut(strings.TrimPrefix(g, "goroutine "), " ")
			ids = append(ids, id)
		}
	}
	return ids
}
