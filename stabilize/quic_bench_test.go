package stabilize

import (
	"testing"
	"time"
)

// BenchmarkQUICRelay relays 1 MiB streams through a running balancer to a
// quic/ backend and back (an echo: 2 MiB relayed per operation), and
// handshakes (a connection with one small exchange), on both listeners;
// "direct" is the same stream with no balancer, the baseline of the ratios.
// cpu-ns/op is the whole process's: client, balancer and backend.
func BenchmarkQUICRelay(b *testing.B) {
	for _, network := range append([]string{"direct"}, networks...) {
		b.Run(network+"/stream_1MiB", func(b *testing.B) {
			be := startQUICBackend(b, "a")
			addr := be.addr.String()
			if network != "direct" {
				addr = startBalancerOn(b, network, false, 30*time.Second, quicHandler(b, "", "", nil, be.dial())).addr
			}
			c := dialQUIC(b, addr, nil, quicClientTLS(b))
			data := make([]byte, 1<<20)
			b.SetBytes(2 << 20)
			defer processCPUPerOp(b)()
			for b.Loop() {
				mustExchange(b, c, data)
			}
		})
		if network == "direct" {
			continue
		}
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
