package stabilize

import (
	"net"
	"testing"
	"time"
)

// TestFlowLimitRefusedMemory floods a listener with refused flows (over
// max_flows), one datagram each, and bounds the Go heap they hold while
// caddy-l4 keeps them until its idle timeout: a refused flow waits for its
// datagrams without a buffer of its own. Each held a 9 KiB buffer for its
// whole life before, about 13-14 KiB of heap per flow in all.
func TestFlowLimitRefusedMemory(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		const flows, batch = 1500, 100
		const maxPerFlow = 8 << 10 // bytes of heap per refused flow: 13-14 KiB with a buffer each
		const inRefuse = "stabilize.(*Handler).refuse"
		before := goroutinesIn(inRefuse)
		t.Cleanup(func() { // after Caddy stops: the next test counts them
			if !waitUntil(5*time.Second, func() bool { return goroutinesIn(inRefuse) <= before }) {
				t.Errorf("%d refused flows still read after Caddy stopped", goroutinesIn(inRefuse)-before)
			}
		})
		_, lb, hd := startWithOne(t, network, PerFlow, map[string]any{"max_flows": 1})
		newClient(t, lb.addr).mustRoundTrip("admitted")
		base := heapInuse()

		to := net.UDPAddrFromAddrPort(mustAddrPort(t, lb.addr))
		refused := func() uint64 { return hd.Drops()["flow_limit"] }
		for sent := batch; sent <= flows; sent += batch {
			for range batch {
				conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
				if err != nil {
					t.Fatal(err)
				}
				_, err = conn.WriteTo([]byte("refused"), to)
				_ = conn.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			// Paced, so that the listener's socket drops none of them.
			waitUntil(2*time.Second, func() bool { return refused() >= uint64(sent) })
		}
		n := refused()
		if n < flows*9/10 {
			t.Fatalf("%d of %d flows refused", n, flows)
		}
		grown := int64(heapInuse()) - int64(base)
		perFlow := grown / int64(n)
		if perFlow > maxPerFlow {
			t.Errorf("%d refused flows hold %d KiB of heap, %d bytes each, over %d", n, grown>>10, perFlow, maxPerFlow)
		} else {
			t.Logf("%d refused flows hold %d KiB of heap, %d bytes each", n, grown>>10, perFlow)
		}
	})
}
