//go:build !linux

package stabilize

import (
	"net"
	"net/netip"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// upstreamConn is a flow's upstream-facing socket.
type upstreamConn = *net.UDPConn

// newUnbound is Linux-only (udpio.Connected).
func newUnbound(family int) (upstreamConn, error) { return udpio.NewUnbound(family) }

// newBound opens a socket on a port of its own, on local if it is valid.
func (h *Handler) newBound(local netip.Addr) (upstreamConn, error) {
	var laddr *net.UDPAddr
	if local.IsValid() {
		laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
	}
	return net.ListenUDP(h.network, laddr)
}

// replace is Linux-only (udpio.Connected).
func (fl *Flow) replace(local, peer netip.AddrPort) error {
	return udpio.Replace(fl.conn, local, peer, nil)
}

// rearm is needed only where sockets are replaced: on Linux.
func (*Flow) rearm() error { return nil }
