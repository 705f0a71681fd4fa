package stabilize

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// waitUDPDrained waits until the kernel holds no datagram for the UDP
// sockets bound to the ports of addrs, for a few polls in a row (a datagram
// between two of them, in the balancer, reaches the next socket meanwhile).
// A test that floods a listener leaves a backlog in its receive buffer, and
// the balancer then passes it on to the upstream's; a fresh client's one
// datagram sent into a full buffer is dropped by the kernel, as UDP may.
func waitUDPDrained(t *testing.T, timeout time.Duration, addrs ...netip.AddrPort) {
	t.Helper()
	const quietPolls = 3
	deadline := time.Now().Add(timeout)
	for quiet := 0; quiet < quietPolls; {
		queued, _ := udpQueues(t, addrs)
		if queued > 0 {
			quiet = 0
		} else {
			quiet++
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v, %d bytes still queued for the sockets of %v", timeout, queued, addrs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// udpDropsNote names how many datagrams the kernel has dropped at the
// sockets of addrs, for a failure message.
func udpDropsNote(t *testing.T, addrs ...netip.AddrPort) string {
	_, drops := udpQueues(t, addrs)
	return fmt.Sprintf(" (datagrams the kernel dropped at the sockets of %v: %v)", addrs, drops)
}

// udpQueues reads /proc/net/udp and udp6: the bytes queued for all UDP
// sockets bound to the ports of addrs, and the datagrams dropped at each
// port's sockets.
func udpQueues(t *testing.T, addrs []netip.AddrPort) (queued uint64, drops []uint64) {
	t.Helper()
	drops = make([]uint64, len(addrs))
	for _, table := range []string{"/proc/net/udp", "/proc/net/udp6"} {
		b, err := os.ReadFile(table)
		if err != nil {
			t.Fatalf("reading the kernel's UDP sockets: %v", err)
		}
		// sl local_address rem_address st tx_queue:rx_queue ... inode ref pointer drops
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 13 {
				continue
			}
			_, port, _ := strings.Cut(f[1], ":")
			_, rx, _ := strings.Cut(f[4], ":")
			for i, a := range addrs {
				if p, err := strconv.ParseUint(port, 16, 16); err != nil || uint16(p) != a.Port() {
					continue
				}
				q, _ := strconv.ParseUint(rx, 16, 64)
				d, _ := strconv.ParseUint(f[12], 10, 64)
				queued += q
				drops[i] += d
			}
		}
	}
	return queued, drops
}
