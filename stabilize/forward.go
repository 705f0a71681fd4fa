package stabilize

import (
	"errors"

	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// forward sends one client datagram upstream. It is the one path of every
// entry point (caddy-l4's Handle and the fastudp socket): it owns the
// truncation check, the routing (health and fail-open included), the PROXY
// header and the drop accounting. It never blocks: a datagram the socket
// cannot take now is dropped and counted.
func (fl *Flow) forward(b []byte, truncated bool) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if fl.closed.Load() {
		return // delivered as it closed; the client's next datagram opens a flow
	}
	h := fl.h
	if truncated {
		h.drop(dropTruncated)
		h.warnOnce(dropTruncated, "dropping datagrams of the listener's buffer size: longer ones arrive truncated",
			zap.Stringer("client", fl.client), zap.Int("size", len(b)))
		return
	}
	u := h.router.route(fl, b)
	if u == nil {
		h.drop(dropNoUpstream)
		return
	}
	if len(fl.header) > 0 {
		buf := datagramPool.Get().(*[maxProxyHeader + ListenerBufferSize]byte)
		defer datagramPool.Put(buf)
		n := copy(buf[:], fl.header)
		b = buf[:n+copy(buf[n:], b)]
	}
	fl.sentTo(u) // before the send, which a reply may overtake
	switch err := fl.send.SendTo(b, u.addr); {
	case err == nil:
		u.host.datagramsSent.Add(1)
		u.host.bytesSent.Add(uint64(len(b)))
	case errors.Is(err, udpio.ErrWouldBlock):
		h.drop(dropSendBufferFull)
	default:
		h.drop(dropWriteError)
	}
}
