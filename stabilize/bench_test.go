package stabilize

import (
	"fmt"
	"runtime"
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

// BenchmarkIdleFlowMemory reports the Go memory (heap and goroutine stacks)
// that one live, idle flow holds in the balancer, after the fast network's
// hand-off. The upstream-facing socket's kernel memory is not included.
func BenchmarkIdleFlowMemory(b *testing.B) {
	const flows = 2000
	for _, network := range []string{"udp", FastNetwork} {
		b.Run(network, func(b *testing.B) {
			a := startUpstream(b, "a")
			lb := startBalancerOn(b, network, false, time.Minute, handlerConfig("flow", "", a))
			newClient(b, lb.addr).mustRoundTrip("warm-up")
			before := goMemory()
			for i := range flows {
				cl := newClient(b, lb.addr)
				cl.mustRoundTrip(fmt.Sprint(i))
				_ = cl.conn.Close() // the balancer's flow stays live
			}
			time.Sleep(fastHandoff + time.Second)
			after := goMemory()
			for b.Loop() {
			}
			b.ReportMetric(float64(after-before)/flows, "B/flow")
		})
	}
}

// goMemory is the heap and stack memory in use after a garbage collection.
func goMemory() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}
