package stabilize

import (
	"testing"
	"time"
)

// BenchmarkQUICRelay relays 1 MiB streams through a running balancer to a
// quic/ backend and back (an echo: 2 MiB relayed per operation), and
// handshakes (a connection with one small exchange), on both listeners.
func BenchmarkQUICRelay(b *testing.B) {
	for _, network := range networks {
		b.Run(network+"/stream_1MiB", func(b *testing.B) {
			be := startQUICBackend(b, "a")
			lb := startBalancerOn(b, network, false, 30*time.Second, quicHandler(b, "", "", nil, be.dial()))
			c := dialQUIC(b, lb.addr, nil, quicClientTLS(b))
			data := make([]byte, 1<<20)
			b.SetBytes(2 << 20)
			for b.Loop() {
				mustExchange(b, c, data)
			}
		})
		b.Run(network+"/handshake", func(b *testing.B) {
			be := startQUICBackend(b, "a")
			lb := startBalancerOn(b, network, false, 30*time.Second, quicHandler(b, "", "", nil, be.dial()))
			for b.Loop() {
				c, err := dialQUICErr(lb.addr, nil, quicClientTLS(b))
				if err != nil {
					b.Fatal(err)
				}
				mustExchange(b, c, []byte("hi"))
				_ = c.CloseWithError(0, "")
			}
		})
	}
}
