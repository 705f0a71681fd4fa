package stabilize

import (
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// upstreamConn is a flow's upstream-facing socket: on Linux outside Go's
// netpoller, as only the reply reactor waits on it (udpio.Socket).
type upstreamConn = *udpio.Socket

// newUnbound opens a `per flow` socket, to be connected (sourceports.go).
func newUnbound(family int) (upstreamConn, error) { return udpio.NewUnbound(family) }

// newBound opens a socket on a port of its own, on local if it is valid.
// An IPv4 local address gets an IPv4 socket, as net.ListenUDP gives it.
func (h *Handler) newBound(local netip.Addr) (upstreamConn, error) {
	family := h.family()
	if local.Is4() {
		family = unix.AF_INET
	}
	return udpio.NewBound(family, local)
}

// replace puts a new socket, bound to local, connected to peer and set up
// for h, in place of fl's.
func (fl *Flow) replace(local, peer netip.AddrPort) error {
	return udpio.Replace(fl.conn, local, peer, func(s *udpio.Socket) error { return fl.h.prepareSocket(s) })
}

// rearm watches the flow's socket again after udpio.Replace put a new one
// behind its descriptor: closing the old one took it off the reactor.
func (fl *Flow) rearm() error {
	r := fl.reactor
	if r == nil {
		return nil
	}
	r.mu.Lock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: fl.slot, Pad: r.slots[fl.slot].gen}
	r.mu.Unlock()
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fl.fd, &ev); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}
