package stabilize

import (
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestQUICUDPSocketBuffers: the sockets that relay a connection to udp/
// upstreams have the handler's read_buffer and write_buffer, and its
// local_addresses: the DATAGRAM socket, which stays open, found among the
// process's sockets by its local address.
func TestQUICUDPSocketBuffers(t *testing.T) {
	forPaths(t, quicUDPPers, func(t *testing.T, network, per string) {
		u := startUpstream(t, "a")
		h := quicHandler(t, per, "", nil, u.dial())
		local := netip.MustParseAddr("127.0.0.5")
		h["local_addresses"] = []string{local.String()}
		h["read_buffer"] = 4096 // the kernel doubles it; its default is far larger
		h["write_buffer"] = 4096
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("hello"))
		// The DATAGRAM socket, opened by the first frame, stays open.
		if reply := datagramExchange(t, c, "datagram"); reply != "a|datagram" {
			t.Fatalf("DATAGRAM frame: reply %q", reply)
		}
		fds := socketsOn(t, local)
		if len(fds) == 0 {
			t.Fatalf("no socket of the process on local_address %s", local)
		}
		for _, fd := range fds {
			for _, o := range []struct {
				name string
				opt  int
			}{{"SO_RCVBUF", unix.SO_RCVBUF}, {"SO_SNDBUF", unix.SO_SNDBUF}} {
				if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, o.opt); err != nil || v > 2*4096 {
					t.Errorf("socket on %s: %s = %d, %v; want 2 × 4096", local, o.name, v, err)
				}
			}
		}
	})
}

// socketsOn returns the process's sockets bound to addr.
func socketsOn(t *testing.T, addr netip.Addr) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	var fds []int
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		sa, err := unix.Getsockname(fd)
		if sa4, ok := sa.(*unix.SockaddrInet4); err == nil && ok && netip.AddrFrom4(sa4.Addr) == addr {
			fds = append(fds, fd)
		}
	}
	return fds
}
