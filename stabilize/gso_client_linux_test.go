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
		ra, rb := a.recorded(), b.recorded()
		if len(ra) < len(rb) {
			ra, rb = rb, ra // ra: the first datagram's upstream
		}
		if per == PerPacket { // round robin: every other datagram each, in order
			sameDatagrams(t, ra, everyOther(want, 0))
			sameDatagrams(t, rb, everyOther(want, 1))
		} else {
			sameDatagrams(t, ra, want)
			sameDatagrams(t, rb, nil)
		}
		if network == FastNetwork {
			if n := fastSocketAt(t, lb.addr).Coalesced(); n < uint64(len(want)) {
				t.Errorf("%d datagrams read coalesced, want %d: UDP GRO is off", n, len(want))
			}
		}
	})
}

// everyOther is ds[from], ds[from+2] and so on.
func everyOther(ds [][]byte, from int) [][]byte {
	var out [][]byte
	for i := from; i < len(ds); i += 2 {
		out = append(out, ds[i])
	}
	return out
}

// sameDatagrams fails t unless an upstream got exactly want, in order.
func sameDatagrams(t *testing.T, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("an upstream got %d datagrams, want %d", len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("datagram %d: %.24q… (%d bytes), want %.24q… (%d bytes)", i, got[i], len(got[i]), want[i], len(want[i]))
		}
	}
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
