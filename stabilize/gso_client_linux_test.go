package stabilize

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// A client that sends with UDP GSO, as quic-go does on Linux, reaches the
// upstreams datagram by datagram, each whole and in order, its first
// burst (a new flow, through caddy-l4) as well as later ones. On fastudp/
// the socket reads its bursts coalesced (UDP GRO) and splits them; on udp/
// the kernel splits them for caddy-l4's socket.
func TestGSOClient(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b := startRawUpstream(t, false, true), startRawUpstream(t, false, true)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, a, b))
		cl := newClient(t, lb.addr)
		var want [][]byte
		for k, n := range []int{12, 40, 64, 3} {
			ds := make([][]byte, n)
			for i := range ds {
				ds[i] = bytes.Repeat(fmt.Appendf(nil, "%d-%02d.", k, i), 30)[:150]
			}
			ds[n-1] = ds[n-1][:7] // the last may be shorter
			sendGSO(t, cl.conn, ds)
			want = append(want, ds...)
			// The first burst opens the flow through caddy-l4; the next
			// may bypass it, so they wait for it.
			eventually(t, 2*time.Second, "the burst", func() bool { return int(a.got.Load()+b.got.Load()) >= len(want) })
		}
		time.Sleep(20 * time.Millisecond) // nothing more
		got := append(a.recorded(), b.recorded()...)
		if per == PerPacket {
			if a.got.Load() == 0 || b.got.Load() == 0 {
				t.Errorf("per packet: %d and %d datagrams, want both upstreams used", a.got.Load(), b.got.Load())
			}
			got = alternate(a, b)
		} else if a.got.Load() != 0 && b.got.Load() != 0 {
			t.Errorf("per %s: %d and %d datagrams, want one upstream", per, a.got.Load(), b.got.Load())
		}
		if len(got) != len(want) {
			t.Fatalf("upstreams got %d datagrams, want %d", len(got), len(want))
		}
		for i := range got {
			if !bytes.Equal(got[i], want[i]) {
				t.Fatalf("datagram %d: %.24q… (%d bytes), want %.24q… (%d bytes)", i, got[i], len(got[i]), want[i], len(want[i]))
			}
		}
		if network == FastNetwork {
			if n := fastSocketAt(t, lb.addr).Coalesced(); n < uint64(len(want)) {
				t.Errorf("%d datagrams read coalesced, want %d: UDP GRO is off", n, len(want))
			}
		}
	})
}

// alternate merges what two upstreams recorded by round robin, starting
// with the one that got more: of an odd number, the first.
func alternate(a, b *rawUpstream) [][]byte {
	lists := [][][]byte{a.recorded(), b.recorded()}
	turn := 0
	if len(lists[0]) < len(lists[1]) {
		turn = 1
	}
	var out [][]byte
	for len(lists[0])+len(lists[1]) > 0 {
		if len(lists[turn]) > 0 {
			out = append(out, lists[turn][0])
			lists[turn] = lists[turn][1:]
		}
		turn = 1 - turn
	}
	return out
}

// sendGSO sends ds from c, a connected socket, as one UDP GSO datagram of
// len(ds[0])-byte segments.
func sendGSO(t *testing.T, c *net.UDPConn, ds [][]byte) {
	t.Helper()
	q := udpio.NewSendQueue(len(ds))
	for _, d := range ds {
		q.Add(d, netip.AddrPort{}, unix.AF_INET)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var errno unix.Errno
	if err := rc.Write(func(fd uintptr) bool { errno = q.SendGSO(fd, 0, q.Len(), len(ds[0])); return true }); err != nil || errno != 0 {
		t.Fatalf("GSO send: %v %v", err, errno)
	}
}
