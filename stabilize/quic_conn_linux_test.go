package stabilize

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// sizeRecorder is a client qlog trace that keeps the size of the largest
// packet received.
type sizeRecorder struct{ max atomic.Int64 }

func (r *sizeRecorder) AddProducer() qlogwriter.Recorder { return r }
func (r *sizeRecorder) SupportsSchemas(string) bool      { return true }
func (r *sizeRecorder) Close() error                     { return nil }

func (r *sizeRecorder) RecordEvent(ev qlogwriter.Event) {
	if p, ok := ev.(qlog.PacketReceived); ok {
		for n := int64(p.Raw.Length); ; {
			m := r.max.Load()
			if n <= m || r.max.CompareAndSwap(m, n) {
				return
			}
		}
	}
}

// quicConnOf is the PacketConn of h's terminating transport.
func quicConnOf(t *testing.T, h *Handler) *quicConn {
	t.Helper()
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	for _, tr := range h.quicHeld.m {
		return tr.conn
	}
	t.Fatal("the handler holds no transport")
	return nil
}

// pmtuMode is a socket's IPv4 IP_MTU_DISCOVER mode.
func pmtuMode(t *testing.T, s *quicSocket) int {
	t.Helper()
	mode, serr := -1, error(nil)
	if err := s.rc.Control(func(fd uintptr) {
		mode, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER)
	}); err != nil || serr != nil {
		t.Fatalf("reading IP_MTU_DISCOVER: %v %v", err, serr)
	}
	return mode
}

// TestQUICPathMTU: the balancer's path-MTU discovery on the client leg
// raises its packets above 1280 bytes on loopback, since the listener
// socket has DF set; after a config reload (on udp/, a new listener socket)
// the socket writes go out of has DF too, and the connection goes on with
// large packets.
func TestQUICPathMTU(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		rec := new(sizeRecorder)
		conf := &quic.Config{Tracer: func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace { return rec }}
		c := dialQUIC(t, lb.addr, conf, quicClientTLS(t))
		data := make([]byte, 1<<20)
		// Path-MTU probes go out every 5 RTTs: a few exchanges give them time.
		for i := 0; i < 20 && rec.max.Load() <= 1280; i++ {
			mustExchange(t, c, data)
		}
		if m := rec.max.Load(); m <= 1280 {
			t.Fatalf("largest packet from the balancer: %d bytes, want more than 1280", m)
		}
		qc := quicConnOf(t, tr.latest())
		before := qc.out.Load().conn
		if mode := pmtuMode(t, qc.out.Load()); mode != unix.IP_PMTUDISC_PROBE {
			t.Fatalf("listener socket IP_MTU_DISCOVER: %d, want %d", mode, unix.IP_PMTUDISC_PROBE)
		}

		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "round_robin", nil, a.dial())), true); err != nil {
			t.Fatal(err)
		}
		rec.max.Store(0)
		mustExchange(t, c, data)
		if m := rec.max.Load(); m <= 1280 {
			t.Fatalf("after the reload, largest packet from the balancer: %d bytes", m)
		}
		// On udp/ writes move to the new listener's socket with a
		// client's first datagram through it. The kernel may go on
		// delivering a client to the old socket, which the transport
		// holds, by a hash of its address: new clients arrive through the
		// new one.
		eventually(t, 5*time.Second, "writes out of the listener's socket", func() bool {
			mustExchange(t, dialQUIC(t, lb.addr, nil, quicClientTLS(t)), []byte("hi"))
			out := qc.out.Load().conn
			return out == qc.latest.Load() && (out != before) == (network == "udp")
		})
		if mode := pmtuMode(t, qc.out.Load()); mode != unix.IP_PMTUDISC_PROBE {
			t.Fatalf("after the reload, IP_MTU_DISCOVER: %d, want %d", mode, unix.IP_PMTUDISC_PROBE)
		}
	})
}

// newTestQUICConn is a quicConn writing out of a socket of its own, and a
// socket that receives from it.
func newTestQUICConn(t *testing.T) (*quicConn, *net.UDPConn) {
	t.Helper()
	listen := func() *net.UDPConn {
		s, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	out, peer := listen(), listen()
	c, err := newQUICConn(out.LocalAddr(), out)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, peer
}

// udpSegment is a UDP_SEGMENT control message, as quic-go appends it.
func udpSegment(size uint16) []byte {
	b := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&b[unix.CmsgLen(0)])) = size
	return b
}

// TestQUICConnWriteMsg: quic-go finds GSO through SyscallConn, as it
// looks for it, and WriteMsgUDP sends with its control messages: one write
// with a GSO segment size arrives as that many datagrams.
func TestQUICConnWriteMsg(t *testing.T) {
	c, peer := newTestQUICConn(t)
	to := peer.LocalAddr().(*net.UDPAddr)
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { _, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT) }); err != nil || serr != nil {
		t.Fatalf("UDP_SEGMENT through SyscallConn: %v %v", err, serr)
	}
	tests := []struct {
		name string
		size int
		oob  []byte
		want []int // datagram sizes received
	}{
		{name: "plain", size: 1200, want: []int{1200}},
		{name: "gso", size: 3*1400 + 100, oob: udpSegment(1400), want: []int{1400, 1400, 1400, 100}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, _, err := c.WriteMsgUDP(make([]byte, tt.size), tt.oob, to)
			if err != nil || n != tt.size {
				t.Fatalf("WriteMsgUDP: %d, %v", n, err)
			}
			buf := make([]byte, 65536)
			for i, want := range tt.want {
				_ = peer.SetReadDeadline(time.Now().Add(2 * time.Second))
				got, from, err := peer.ReadFromUDPAddrPort(buf)
				if err != nil || got != want || from != c.out.Load().conn.LocalAddr().(*net.UDPAddr).AddrPort() {
					t.Fatalf("datagram %d: %d bytes from %v (%v), want %d", i, got, from, err, want)
				}
			}
		})
	}
	if n := c.writeErrors.Load(); n != 0 {
		t.Fatalf("write errors counted: %d", n)
	}
}

// TestQUICConnReadBatch: ReadBatch returns the datagrams queued, several
// in one call, with their clients' addresses in one form; a read deadline
// interrupts a waiting ReadBatch with a temporary error, and Close ends it.
func TestQUICConnReadBatch(t *testing.T) {
	c, _ := newTestQUICConn(t)
	ms := make([]ipv4.Message, 4)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, 1452)}
		ms[i].OOB = make([]byte, 128)
	}
	a := netip.MustParseAddrPort("127.0.0.1:1000")
	b := netip.MustParseAddrPort("[::ffff:127.0.0.2]:2000")
	for i, from := range []netip.AddrPort{a, a, b, a, b, b} {
		c.deliver([]byte{byte(i)}, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), netip.Addr{})
	}
	for _, want := range [][]byte{{0, 1, 2, 3}, {4, 5}} {
		n, err := c.ReadBatch(ms, 0)
		if err != nil || n != len(want) {
			t.Fatalf("ReadBatch: %d, %v; want %d datagrams", n, err, len(want))
		}
		for i, m := range ms[:n] {
			ua := m.Addr.(*net.UDPAddr)
			if m.N != 1 || m.Buffers[0][0] != want[i] || m.NN != 0 || len(ua.IP) != net.IPv4len {
				t.Fatalf("message %d: %d bytes %v from %v (%d-byte IP), oob %d", i, m.N, m.Buffers[0][:m.N], ua, len(ua.IP), m.NN)
			}
		}
	}
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.ReadBatch(ms, 0)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadBatch past the deadline: %v", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := c.ReadBatch(ms, 0)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	_ = c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("ReadBatch after Close: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not end a waiting ReadBatch")
	}
}

// TestQUICConnAllocs: a busy client's datagrams cost no allocation, read
// in a batch or written with control messages.
func TestQUICConnAllocs(t *testing.T) {
	c, peer := newTestQUICConn(t)
	to := peer.LocalAddr().(*net.UDPAddr)
	ms := make([]ipv4.Message, 8)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, 1452)}
	}
	from := netip.MustParseAddrPort("127.0.0.1:1000")
	b, oob := make([]byte, 2400), udpSegment(1200)
	allocs := testing.AllocsPerRun(100, func() {
		c.deliver(b[:1200], from, netip.Addr{})
		if n, err := c.ReadBatch(ms, 0); n != 1 || err != nil {
			t.Fatalf("ReadBatch: %d, %v", n, err)
		}
		if _, _, err := c.WriteMsgUDP(b, oob, to); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per datagram, want 0", allocs)
	}
}

// TestQUICConnHasGSO: only a write carrying UDP_SEGMENT passes EIO or
// EINVAL back to quic-go, which would otherwise resend it as zero-length
// segments.
func TestQUICConnHasGSO(t *testing.T) {
	tos := make([]byte, unix.CmsgSpace(4))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&tos[0]))
	h.Level, h.Type = unix.IPPROTO_IP, unix.IP_TOS
	h.SetLen(unix.CmsgLen(4))
	for _, tt := range []struct {
		name string
		oob  []byte
		want bool
	}{
		{"none", nil, false},
		{"tos", tos, false},
		{"gso", udpSegment(1400), true},
		{"tos and gso", append(append([]byte{}, tos...), udpSegment(1400)...), true},
	} {
		if got := hasGSO(tt.oob); got != tt.want {
			t.Errorf("%s: hasGSO %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestZoneIDCached: a write to a link-local IPv6 client finds its zone's
// interface index as net.InterfaceByName does, but from a cache, without
// asking the kernel (and allocating) for every datagram.
func TestZoneIDCached(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Skipf("no loopback interface: %v", err)
	}
	for zone, want := range map[string]uint32{"": 0, "lo": uint32(lo.Index), "4242": 4242} {
		if got := zoneID(zone); got != want {
			t.Errorf("zone %q: index %d, want %d", zone, got, want)
		}
	}
	if allocs := testing.AllocsPerRun(100, func() { zoneID("lo") }); allocs != 0 {
		t.Fatalf("%.1f allocations per lookup of a known zone, want 0", allocs)
	}
}
