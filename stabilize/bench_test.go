package stabilize

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
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
				benchRoundTrips(b, newClient(b, lb.addr))
			})
		}
	}
}

// benchRoundTrips establishes cl's flow, then times round trips of a
// 64-byte datagram.
func benchRoundTrips(b *testing.B, cl *client) {
	payload := make([]byte, 64)
	for range 100 { // establish the flow
		if _, _, err := cl.roundTrip(payload, time.Second); err != nil {
			b.Fatal(err)
		}
	}
	// The warm-up's read deadline would end a longer run: a lost datagram
	// still fails it, within a minute.
	_ = cl.conn.SetReadDeadline(time.Now().Add(time.Minute))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cl.conn.Write(payload); err != nil {
			b.Fatal(err)
		}
		if _, err := cl.conn.Read(cl.buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIdleFlowMemory reports the Go memory (heap and goroutine stacks)
// that one live, idle flow holds in the balancer, at 10,000 flows, after the
// fast network's hand-off. The upstream-facing socket's kernel memory is not
// included. Each client sends from an address of its own in 127.0.0.0/8, so
// that no closed client's port comes back as another client.
func BenchmarkIdleFlowMemory(b *testing.B) {
	for _, network := range []string{"udp", FastNetwork} {
		b.Run(network, func(b *testing.B) {
			goPerFlow, slabPerFlow := idleFlowMemory(b, network, 10_000)
			for b.Loop() {
			}
			b.ReportMetric(goPerFlow, "B/flow")
			if slabPerFlow > 0 {
				b.ReportMetric(slabPerFlow, "kernel-slab-B/flow")
			}
		})
	}
}

// TestIdleFlowMemory holds the Go memory of an idle flow to its budget: 6
// KiB once the fast socket keeps it; on udp/ caddy-l4 keeps a goroutine
// per flow (an 8 KiB stack) reading it.
func TestIdleFlowMemory(t *testing.T) {
	budget := map[string]float64{"udp": 20 << 10, FastNetwork: 6 << 10}
	forNetworks(t, func(t *testing.T, network string) {
		goPerFlow, _ := idleFlowMemory(t, network, 2_000)
		t.Logf("%.0f B of Go memory per idle flow", goPerFlow)
		if goPerFlow > budget[network] {
			t.Errorf("%.0f B of Go memory per idle flow, want at most %.0f", goPerFlow, budget[network])
		}
	})
}

// idleFlowMemory opens flows idle flows, one round trip each from its own
// client address, and returns the Go memory (heap and stacks) and the
// kernel's slab memory (0 where unknown) each holds once the fast socket
// has taken them over.
func idleFlowMemory(t testing.TB, network string, flows int) (goPerFlow, slabPerFlow float64) {
	a := startUpstream(t, "a")
	lb := startBalancerOn(t, network, false, time.Minute, handlerConfig("flow", "", a))
	newClient(t, lb.addr).mustRoundTrip("warm-up")
	before, slabBefore := goMemory(), slabBytes()
	raddr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(lb.addr))
	for i := range flows {
		conn, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 3, byte(i>>8), byte(i))}, raddr)
		if err != nil {
			t.Fatal(err)
		}
		cl := &client{t: t, conn: conn, buf: make([]byte, 2048)}
		cl.mustRoundTrip(fmt.Sprint(i))
		_ = conn.Close() // the balancer's flow stays live
	}
	time.Sleep(fastHandoff + time.Second)
	after, slabAfter := goMemory(), slabBytes()
	if slabBefore > 0 {
		slabPerFlow = float64(slabAfter-slabBefore) / float64(flows)
	}
	return float64(after-before) / float64(flows), slabPerFlow
}

// goMemory is the heap and stack memory in use after a garbage collection.
// slabBytes is the kernel's slab memory (/proc/meminfo, the whole system:
// other processes add noise), or 0 where there is none.
func slabBytes() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Slab:"); ok {
			var kb int64
			_, _ = fmt.Sscan(rest, &kb)
			return kb << 10
		}
	}
	return 0
}

func goMemory() int64 {
	runtime.GC()
	runtime.GC() // and what sync.Pools kept through the first
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// BenchmarkForwardBatch forwards a batch of datagrams of one established
// fastudp flow, as the fast socket delivers a read batch: one datagram at a
// time (a sendto each) or in one forwardBatch (one sendmmsg). ns/op is per
// batch; the upstream drains its socket with recvmmsg.
func BenchmarkForwardBatch(b *testing.B) {
	for _, per := range []string{PerPacket, PerFlow} {
		for _, size := range []int{1, 8, 32} {
			for _, batched := range []bool{false, true} {
				name := fmt.Sprintf("%s/%d/one-by-one", per, size)
				if batched {
					name = fmt.Sprintf("%s/%d/batched", per, size)
				}
				b.Run(name, func(b *testing.B) { benchmarkForwardBatch(b, per, size, batched) })
			}
		}
	}
}

func benchmarkForwardBatch(b *testing.B, per string, size int, batched bool) {
	sink := startSink(b)
	var h *Handler
	handlerProvisioned = func(hh *Handler) { h = hh }
	b.Cleanup(func() { handlerProvisioned = nil })
	lb := startBalancerOn(b, FastNetwork, false, 30*time.Second,
		map[string]any{"handler": "stabilize", "per": per, "upstreams": []any{map[string]any{"dial": "udp/" + sink.addr.String()}}})
	cl := newClient(b, lb.addr)
	if _, err := cl.conn.Write([]byte("open")); err != nil {
		b.Fatal(err)
	}
	var fl *Flow
	for fl == nil {
		time.Sleep(10 * time.Millisecond)
		h.mu.Lock()
		for f := range h.flows {
			fl = f
		}
		h.mu.Unlock()
	}
	payload := make([]byte, 64)
	ds := make([]fastudp.Datagram, size)
	for i := range ds {
		ds[i] = fastudp.Datagram{B: payload}
	}
	b.ReportAllocs()
	for b.Loop() {
		if batched {
			fl.forwardBatch(ds)
			continue
		}
		for _, d := range ds {
			fl.forward(d.B, false)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*size), "ns/datagram")
	b.ReportMetric(float64(h.drops[dropSendBufferFull].Load())/float64(b.N*size), "drops/datagram")
	time.Sleep(50 * time.Millisecond) // the sink drains
	b.ReportMetric(float64(sink.got.Load())/float64(b.N*size+1), "received/datagram")
}

// sink is a UDP server that reads and discards datagrams, by recvmmsg.
type sink struct {
	addr netip.AddrPort
	got  atomic.Int64
}

func startSink(t testing.TB) *sink {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	udpio.GrowBuffers(conn, 8<<20)
	batch, err := udpio.NewBatch(conn, 64, 2048)
	if err != nil {
		t.Fatal(err)
	}
	s := &sink{addr: conn.LocalAddr().(*net.UDPAddr).AddrPort()}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			n, err := batch.Read()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.got.Add(int64(n))
		}
	}()
	t.Cleanup(func() {
		_ = conn.Close()
		<-done
	})
	return s
}

// BenchmarkNewFlow opens one new client flow per iteration: a datagram from
// a new source address, through caddy-l4's dispatch and Handle, which opens
// the flow and its upstream-facing socket, and the reply. The client's own
// socket is included; "client" measures that alone, as the baseline. On
// Linux cpu-ns/op is the process's CPU time: the balancer's, the client's
// and the upstream's.
func BenchmarkNewFlow(b *testing.B) {
	payload := make([]byte, 64)
	b.Run("client", func(b *testing.B) {
		a := startUpstream(b, "a")
		buf := make([]byte, 128)
		var next newClientAddr
		defer processCPUPerOp(b)()
		for b.Loop() {
			c, err := net.DialUDP("udp", next.addr(), net.UDPAddrFromAddrPort(a.addr))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Write(payload); err != nil {
				b.Fatal(err)
			}
			if _, err := c.Read(buf); err != nil {
				b.Fatal(err)
			}
			_ = c.Close()
		}
	})
	for _, network := range []string{"udp", FastNetwork} {
		b.Run(network, func(b *testing.B) {
			a := startUpstream(b, "a")
			lb := startBalancerOn(b, network, false, 2*time.Second, handlerConfig(PerFlow, "", a))
			to := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(lb.addr))
			buf := make([]byte, 128)
			var next newClientAddr
			b.ReportAllocs()
			defer processCPUPerOp(b)()
			for b.Loop() {
				c, err := net.DialUDP("udp", next.addr(), to)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(payload); err != nil {
					b.Fatal(err)
				}
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
				_ = c.Close()
			}
		})
	}
}

// newClientAddr hands out client addresses that no earlier iteration used,
// 127.1.0.1 and up, with a port the kernel picks: a port alone may come
// back while the flow of its previous client is still open, and that
// would not be a new flow.
type newClientAddr uint32

func (n *newClientAddr) addr() *net.UDPAddr {
	*n++
	i := uint32(*n)
	return &net.UDPAddr{IP: net.IPv4(127, byte(1+i>>16), byte(i>>8), byte(i))}
}
