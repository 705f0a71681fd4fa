//go:build !linux

package stabilize

import (
	"net/netip"
	"testing"
	"time"
)

// waitUDPDrained has no count of the datagrams the kernel queues for a
// socket to read here: it gives the balancer and the upstream a second to
// drain the backlog a flood leaves, at most a few hundred datagrams each.
func waitUDPDrained(_ *testing.T, _ time.Duration, _ ...netip.AddrPort) {
	time.Sleep(time.Second)
}

// udpDropsNote has no drop counts to name here.
func udpDropsNote(*testing.T, ...netip.AddrPort) string { return "" }
