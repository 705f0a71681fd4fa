package stabilize

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
	"go.uber.org/zap"
)

// Error codes of QUIC termination: application error codes of the
// connection close that stabilize sends, and stream error codes of the
// resets it sends, when the other side of the relay gave none.
const (
	// QUICErrNoUpstream closes a client connection that no upstream could
	// take: none is healthy, the backend connection failed, or, with udp/
	// upstreams, a reload left none.
	QUICErrNoUpstream quic.ApplicationErrorCode = 0x5350
	// QUICErrUpstreamGone closes a client connection whose backend
	// connection ended without an application close (idle timeout, crash,
	// stateless reset), and a backend connection whose client went so.
	QUICErrUpstreamGone quic.ApplicationErrorCode = 0x5351
	// QUICErrStreamRelay resets a stream whose other side failed without a
	// stream error code.
	QUICErrStreamRelay quic.StreamErrorCode = 0x5352
	// QUICErrRequestTooLarge resets a udp/ request stream longer than a
	// UDP datagram (65,507 bytes).
	QUICErrRequestTooLarge quic.StreamErrorCode = 0x5353
	// QUICErrReplyTimeout resets a udp/ request stream that got no reply
	// within reply_timeout, or an ICMP error (port, host or network
	// unreachable) instead.
	QUICErrReplyTimeout quic.StreamErrorCode = 0x5354
)

// maxUDPPayload is the longest UDP datagram over IPv4.
const maxUDPPayload = 65507

// quicHostStats is the QUIC relay's counters of one upstream.
type quicHostStats struct {
	conns              atomic.Int64  // live relayed client connections
	streams            atomic.Uint64 // streams relayed, both directions
	bytesUp, bytesDown atomic.Uint64 // relayed stream bytes to and from the upstream
}

// Conns is the number of live QUIC connections relayed to the host.
func (h *Host) QUICConns() int64 { return h.quic.conns.Load() }

// serveQUIC relays one client connection, accepted by h from the
// transport t.
func (h *Handler) serveQUIC(t *quicTransport, c *quic.Conn) {
	q := h.QUIC
	select {
	case <-c.HandshakeComplete():
	case <-c.Context().Done():
		q.stats.failed[quicFailHandshake].Add(1)
		return
	}
	q.stats.accepted.Add(1)
	q.stats.active.Add(1)
	defer q.stats.active.Add(-1)
	if c.ConnectionState().Used0RTT {
		q.stats.zeroRTT.Add(1)
	}
	client := addrPort(c.RemoteAddr())
	if q.udp {
		h.relayUDP(t, c, client)
		return
	}
	u := h.pickQUIC(c, client)
	if u == nil {
		q.stats.failed[quicFailNoUpstream].Add(1)
		_ = c.CloseWithError(QUICErrNoUpstream, "no upstream available")
		return
	}
	u.host.flows.Add(1)
	u.host.quic.conns.Add(1)
	defer u.host.flows.Add(-1)
	defer u.host.quic.conns.Add(-1)
	var b *quic.Conn
	bt, err := acquireBackendTransport()
	dialed := err == nil // else the failure is the balancer's own socket
	if dialed {
		defer releaseBackendTransport()
		b, err = h.dialBackend(c, u, bt)
	}
	if err != nil {
		q.stats.failed[quicFailDial].Add(1)
		// A dial the client's end cut short says nothing of the upstream.
		if dialed && h.HealthChecks != nil && h.HealthChecks.Passive != nil && c.Context().Err() == nil {
			h.passiveFailure(u, "QUIC dial: "+err.Error())
		}
		level := zap.DebugLevel
		if !q.stats.dialWarned.Swap(true) {
			level = zap.WarnLevel // the first; the metrics count the others
		}
		if ce := h.logger.Check(level, "backend QUIC connection failed"); ce != nil {
			ce.Write(zap.Stringer("upstream", u.addr), zap.Error(err))
		}
		_ = c.CloseWithError(QUICErrNoUpstream, "upstream unavailable")
		return
	}
	relayConns(c, b, &u.host.quic)
}

// pickQUIC asks the policy for an upstream for the client connection c
// from client.
func (h *Handler) pickQUIC(c *quic.Conn, client netip.AddrPort) *Upstream {
	pool, _ := h.candidates()
	if pool == nil {
		return nil
	}
	return h.selector.Select(pool, &Request{Client: client, quic: c})
}

// quicReplacer expands the placeholders of a terminated connection, for a
// maglev key: l4.conn.remote_addr, l4.conn.remote_ip and
// l4.conn.local_addr, and the server name the client asked for,
// l4.tls.server_name (or l4.quic.tls.server_name, as caddy-l4's quic
// matcher calls it).
func quicReplacer(c *quic.Conn, client netip.AddrPort) *caddy.Replacer {
	repl := caddy.NewReplacer()
	sni := c.ConnectionState().TLS.ServerName
	repl.Set("l4.conn.remote_addr", client.String())
	repl.Set("l4.conn.remote_ip", client.Addr().String())
	repl.Set("l4.conn.local_addr", c.LocalAddr().String())
	repl.Set("l4.tls.server_name", sni)
	repl.Set("l4.quic.tls.server_name", sni)
	return repl
}

// relayConns relays every stream and datagram between the client
// connection c and the backend connection b until either ends, then closes
// the other with the same application error code (or QUICErrUpstreamGone).
func relayConns(c, b *quic.Conn, st *quicHostStats) {
	var wg sync.WaitGroup
	wg.Go(func() { relayBidi(c, b, st, true) })
	wg.Go(func() { relayBidi(b, c, st, false) })
	wg.Go(func() { relayUni(c, b, st, true) })
	wg.Go(func() { relayUni(b, c, st, false) })
	// DATAGRAM frames, read wherever a peer may send them (where the
	// relay advertised them), so none pile up unread; the other side
	// gets them if it takes them, else they are dropped.
	if c.ConnectionState().SupportsDatagrams.Local {
		wg.Go(func() { relayDatagrams(c, b) })
	}
	if b.ConnectionState().SupportsDatagrams.Local {
		wg.Go(func() { relayDatagrams(b, c) })
	}
	select {
	case <-c.Context().Done():
		closeLike(b, c)
	case <-b.Context().Done():
		closeLike(c, b)
	}
	wg.Wait()
}

// closeLike closes c as ended was closed: with its application error code
// and message, or with QUICErrUpstreamGone.
func closeLike(c, ended *quic.Conn) {
	var ae *quic.ApplicationError
	if errors.As(context.Cause(ended.Context()), &ae) {
		_ = c.CloseWithError(ae.ErrorCode, ae.ErrorMessage)
		return
	}
	_ = c.CloseWithError(QUICErrUpstreamGone, "the other side of the relay is gone")
}

// relayBidi relays the bidirectional streams that from opens to to.
func relayBidi(from, to *quic.Conn, st *quicHostStats, up bool) {
	ctx := from.Context()
	for {
		s, err := from.AcceptStream(ctx)
		if err != nil {
			return
		}
		st.streams.Add(1)
		// Opened here, in accept order, the stream gets the same ID on
		// both legs, which HTTP/3 datagrams and WebTransport name.
		t, err := to.OpenStreamSync(ctx)
		if err != nil {
			s.CancelRead(QUICErrStreamRelay)
			s.CancelWrite(QUICErrStreamRelay)
			continue
		}
		in, out := &st.bytesUp, &st.bytesDown
		if !up {
			in, out = out, in
		}
		go pipe(t, s, in)
		go pipe(s, t, out)
	}
}

// relayUni relays the unidirectional streams that from opens to to.
func relayUni(from, to *quic.Conn, st *quicHostStats, up bool) {
	ctx := from.Context()
	n := &st.bytesUp
	if !up {
		n = &st.bytesDown
	}
	for {
		s, err := from.AcceptUniStream(ctx)
		if err != nil {
			return
		}
		st.streams.Add(1)
		t, err := to.OpenUniStreamSync(ctx) // in accept order, as relayBidi
		if err != nil {
			s.CancelRead(QUICErrStreamRelay)
			continue
		}
		go pipe(t, s, n)
	}
}

// sendSide is the sending half of a stream.
type sendSide interface {
	io.Writer
	Close() error
	CancelWrite(quic.StreamErrorCode)
	Context() context.Context // ends when the peer sends STOP_SENDING, among others
}

// recvSide is the receiving half of a stream.
type recvSide interface {
	io.Reader
	CancelRead(quic.StreamErrorCode)
}

// The buffers of pipe: a stream waiting for data holds a small one, and
// takes a large one once a read fills the small one.
var (
	smallRelayBuffers = sync.Pool{New: func() any { return new([1 << 10]byte) }}
	relayBuffers      = sync.Pool{New: func() any { return new([32 << 10]byte) }}
)

// pipe copies src to dst, passing on the end of the stream: FIN as FIN, a
// RESET_STREAM on src as one on dst, and a STOP_SENDING on dst as one on
// src, each with its error code.
func pipe(dst sendSide, src recvSide, bytes *atomic.Uint64) {
	// A STOP_SENDING on dst stops src at once, even while it waits for
	// data: a peer that writes only when it has to hears of it.
	stop := context.AfterFunc(dst.Context(), func() {
		var se *quic.StreamError
		if errors.As(context.Cause(dst.Context()), &se) && se.Remote {
			src.CancelRead(se.ErrorCode)
		}
	})
	defer stop()
	small := smallRelayBuffers.Get().(*[1 << 10]byte)
	var large *[32 << 10]byte
	defer func() {
		if large != nil {
			relayBuffers.Put(large)
		} else {
			smallRelayBuffers.Put(small)
		}
	}()
	buf := small[:]
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.CancelRead(streamErrorCode(werr))
				return
			}
			bytes.Add(uint64(n))
		}
		if n == len(buf) && large == nil { // more is coming: a large buffer
			large = relayBuffers.Get().(*[32 << 10]byte)
			smallRelayBuffers.Put(small)
			buf = large[:]
		}
		switch {
		case err == io.EOF:
			_ = dst.Close()
			return
		case err != nil:
			dst.CancelWrite(streamErrorCode(err))
			return
		}
	}
}

// streamErrorCode is the code of a stream error that the peer sent, or
// QUICErrStreamRelay.
func streamErrorCode(err error) quic.StreamErrorCode {
	var se *quic.StreamError
	if errors.As(err, &se) && se.Remote {
		return se.ErrorCode
	}
	return QUICErrStreamRelay
}

// relayDatagrams relays the DATAGRAM frames that from receives to to.
func relayDatagrams(from, to *quic.Conn) {
	ctx := from.Context()
	for {
		b, err := from.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		_ = to.SendDatagram(b) // unreliable: lost if too large, or if to takes none
	}
}

// addrPortUnmap is ap with its address unmapped.
func addrPortUnmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Interface guards
var (
	_ sendSide = (*quic.Stream)(nil)
	_ sendSide = (*quic.SendStream)(nil)
	_ recvSide = (*quic.Stream)(nil)
	_ recvSide = (*quic.ReceiveStream)(nil)
)
