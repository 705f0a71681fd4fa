package stabilize

import (
	"errors"

	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// forward sends one client datagram upstream, as forwardBatch does.
func (fl *Flow) forward(b []byte, truncated bool) {
	ds := [1]fastudp.Datagram{{B: b, Truncated: truncated}}
	fl.forwardBatch(ds[:])
}

// forwardBatch sends client datagrams upstream, in their order. It is the
// one path of every entry point (caddy-l4's Handle, one datagram at a time,
// and the fastudp socket, a read batch's datagrams of the flow at a time):
// it owns the truncation check, the routing (health and fail-open
// included), the PROXY header and the drop accounting. Several datagrams
// leave with one sendmmsg (Linux). It never blocks: a datagram the socket
// cannot take now is dropped and counted.
func (fl *Flow) forwardBatch(ds []fastudp.Datagram) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if fl.closed.Load() {
		return // delivered as it closed; the client's next datagram opens a flow
	}
	if dst := ds[len(ds)-1].Dst; dst.IsValid() && dst != fl.dst {
		fl.setDst(dst) // the client sent to another of the host's addresses
	}
	h := fl.h
	var sb *sendBatch
	if len(ds) > 1 && len(fl.header) == 0 {
		sb = newSendBatch() // nil where there is no sendmmsg
	}
	for _, d := range ds {
		b := d.B
		if d.Truncated {
			h.drop(dropTruncated)
			h.warnOnce(dropTruncated, "dropping datagrams of the listener's buffer size: longer ones arrive truncated",
				zap.Stringer("client", fl.client), zap.Int("size", len(b)))
			continue
		}
		u := h.router.route(fl, b)
		if u == nil {
			h.drop(dropNoUpstream)
			continue
		}
		if !fl.connectTo(u, sb) { // per flow: the socket is connected to u
			continue
		}
		fl.sentTo(u) // before the send, which a reply may overtake
		if sb != nil {
			fl.queue(sb, b, u)
			continue
		}
		fl.send1(b, u)
	}
	if sb != nil {
		fl.flush(sb)
		sb.release()
	}
}

// send1 sends one datagram to u, after the PROXY header if there is one.
// fl.mu is held.
func (fl *Flow) send1(b []byte, u *Upstream) {
	if len(fl.header) > 0 {
		buf := datagramPool.Get().(*[maxProxyHeader + ListenerBufferSize]byte)
		defer datagramPool.Put(buf)
		n := copy(buf[:], fl.header)
		b = buf[:n+copy(buf[n:], b)]
	}
	switch err := fl.send.SendTo(b, fl.sendAddr(u)); {
	case err == nil:
		u.host.datagramsSent.Add(1)
		u.host.bytesSent.Add(uint64(len(b)))
	case errors.Is(err, udpio.ErrWouldBlock):
		fl.h.drop(dropSendBufferFull)
	default:
		fl.h.drop(dropWriteError)
	}
}
