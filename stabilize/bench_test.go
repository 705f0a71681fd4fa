package stabilize

import (
	"testing"
	"time"
)

// BenchmarkRoundTrip sends one datagram through a running balancer and
// waits for the reply: client → listener → flow → upstream → flow → client.
// On the fast network the steady state allocates nothing; on udp/ the
// allocations are caddy-l4's listener's.
func BenchmarkRoundTrip(b *testing.B) {
	for _, network := range []string{"udp", FastNetwork} {
		for _, per := range []string{"packet", "flow"} {
			b.Run(network+"/"+per, func(b *testing.B) {
				a, c := startUpstream(b, "a"), startUpstream(b, "c")
				lb := startBalancerOn(b, network, false, 30*time.Second, handlerConfig(per, "", a, c))
				cl := newClient(b, lb.addr)
				payload := make([]byte, 64)
				for range 100 { // establish the flow
					if _, _, err := cl.roundTrip(payload, time.Second); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportAllocs()
				for b.Loop() {
					if _, err := cl.conn.Write(payload); err != nil {
						b.Fatal(err)
					}
					if _, err := cl.conn.Read(cl.buf); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
