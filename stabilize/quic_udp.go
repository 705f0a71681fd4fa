package stabilize

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"go.uber.org/zap"
)

// udp/ upstreams behind QUIC termination
//
// Each stream of a client connection is one request: read to its FIN and
// sent as one datagram, from a socket of its own connected to the
// upstream, so that the kernel reports ICMP errors to it; the one reply
// datagram goes back on the stream, then FIN. Each DATAGRAM frame is one
// datagram each way, through one socket per connection and address
// family. Every request and DATAGRAM frame follows the listener
// transport's current handler, the newest config's: its upstreams,
// granularity, health checks, local_addresses and buffer sizes; a
// DATAGRAM socket that a reload left with another local address or other
// buffer sizes is replaced.

// udpRelay is a client connection relayed to udp/ upstreams.
type udpRelay struct {
	c      *quic.Conn
	t      *quicTransport // whose current handler picks the upstreams
	client netip.AddrPort

	mu     sync.Mutex
	fixed  *Upstream     // per flow: the connection's upstream, counted in its host
	req    Request       // per flow: the policy's request for the connection
	src    [2]netip.Addr // the connection's IPv6 and IPv4 local_addresses, once taken
	closed bool          // the connection has ended: no more picks
}

// relayUDP serves the client connection c, accepted by h from the
// transport t: each stream is one request datagram, answered by one reply
// datagram, and each DATAGRAM frame is one datagram each way.
func (h *Handler) relayUDP(t *quicTransport, c *quic.Conn, client netip.AddrPort) {
	r := &udpRelay{c: c, t: t, client: client, req: Request{Client: client, quic: c}}
	defer r.release()
	if _, perFlow := h.router.(perFlowRouter); perFlow {
		if _, first := r.pick(); first == nil {
			h.QUIC.stats.failed[quicFailNoUpstream].Add(1)
			_ = c.CloseWithError(QUICErrNoUpstream, "no upstream available")
			return
		}
	}
	ctx := c.Context()
	var wg sync.WaitGroup
	wg.Go(r.datagramsUp)
	wg.Go(func() {
		for {
			s, err := c.AcceptUniStream(ctx)
			if err != nil {
				return
			}
			go r.request(s, nil)
		}
	})
	for {
		s, err := c.AcceptStream(ctx)
		if err != nil {
			break
		}
		go r.request(s, s)
	}
	wg.Wait()
}

// pick returns the upstream of the connection's next request and the
// handler it belongs to, the transport's current one; nil when no
// upstream can take it. A connection whose current handler relays to
// quic/ upstreams is closed: a reload removed its upstreams.
func (r *udpRelay) pick() (*Handler, *Upstream) {
	h := r.t.cur.Load()
	if !h.QUIC.udp {
		_ = r.c.CloseWithError(QUICErrNoUpstream, "the upstreams are no longer udp/")
		return nil, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return h, nil // a request that outlived the connection
	}
	if _, perFlow := h.router.(perFlowRouter); !perFlow {
		r.setFixed(nil) // after a reload from per flow
		return h, h.pickQUIC(r.c, r.client)
	}
	u := r.fixed
	if u != nil {
		u = h.byAddr[u.addr] // h's own upstream, or none: a reload removed it
	}
	if u = h.stick(u, &r.req); u != nil {
		r.setFixed(u)
	}
	return h, u
}

// setFixed makes u the connection's upstream, counted in its host. r.mu is
// held.
func (r *udpRelay) setFixed(u *Upstream) {
	if u == r.fixed {
		return
	}
	if f := r.fixed; f != nil {
		f.host.flows.Add(-1)
		f.host.quic.conns.Add(-1)
	}
	if u != nil {
		u.host.flows.Add(1)
		u.host.quic.conns.Add(1)
	}
	r.fixed = u
}

// release lets the connection's upstream go, once it has ended.
func (r *udpRelay) release() {
	r.mu.Lock()
	r.setFixed(nil)
	r.closed = true
	r.mu.Unlock()
}

// local returns the connection's local address towards peer: one of h's
// local_addresses of peer's family, taken in turn on first use and kept;
// none (the kernel's choice) without local_addresses.
func (r *udpRelay) local(h *Handler, peer netip.AddrPort) netip.Addr {
	is4 := peer.Addr().Unmap().Is4()
	locals := h.localsOf(is4)
	if len(locals) == 0 {
		return netip.Addr{}
	}
	i := 0
	if is4 {
		i = 1
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Contains(locals, r.src[i]) { // none yet, or a reload changed them
		r.src[i] = locals[int(h.nextLocal.Add(1))%len(locals)]
	}
	return r.src[i]
}

// udpSocket opens a socket of network to udp/ upstreams, from local when
// it is valid, with read_buffer and write_buffer; connected to peer when it
// is valid, with ICMP errors reported in full for passive health checks.
func (h *Handler) udpSocket(network string, local netip.Addr, peer netip.AddrPort) (*net.UDPConn, error) {
	var laddr *net.UDPAddr
	if local.IsValid() {
		laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
	}
	var conn *net.UDPConn
	var err error
	prepare := h.sizeSocket
	if peer.IsValid() {
		conn, err = net.DialUDP(network, laddr, net.UDPAddrFromAddrPort(peer))
		prepare = h.prepareSocket
	} else {
		conn, err = net.ListenUDP(network, laddr)
	}
	if err != nil {
		return nil, err // names the addresses
	}
	if err := prepare(conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return conn, nil
}

// request sends the stream's data as one datagram to an upstream and,
// when reply is not nil, writes the one reply datagram back and ends the
// stream.
func (r *udpRelay) request(s recvSide, reply sendSide) {
	fail := func(code quic.StreamErrorCode) {
		s.CancelRead(code)
		if reply != nil {
			reply.CancelWrite(code)
		}
	}
	// The buffer grows with the data: a stream waiting for its first
	// byte holds none.
	req, err := io.ReadAll(io.LimitReader(s, maxUDPPayload+1))
	switch {
	case err != nil:
		if reply != nil {
			reply.CancelWrite(streamErrorCode(err))
		}
		return
	case len(req) > maxUDPPayload:
		fail(QUICErrRequestTooLarge)
		return
	}
	h, u := r.pick()
	if u == nil {
		fail(QUICErrStreamRelay)
		return
	}
	conn, err := h.udpSocket(h.network, r.local(h, u.addr), u.addr)
	if err != nil {
		h.drop(dropSocketUnavailable)
		h.warnOnce(dropSocketUnavailable, "cannot open a socket to a udp/ upstream",
			zap.Stringer("upstream", u.addr), zap.Error(err))
		fail(QUICErrStreamRelay)
		return
	}
	defer conn.Close()
	if _, err := conn.Write(req); err != nil {
		h.drop(dropWriteError)
		fail(QUICErrStreamRelay)
		return
	}
	u.host.quic.streams.Add(1)
	u.host.quic.bytesUp.Add(uint64(len(req)))
	u.host.datagramsSent.Add(1)
	u.host.bytesSent.Add(uint64(len(req)))
	if reply != nil {
		h.awaitReply(conn, u, reply)
	}
}

// awaitReply writes the reply to the request sent on conn to u back on
// the stream, then FIN; without one within quic.reply_timeout it resets the
// stream. With passive checks, a request that draws an ICMP error, or
// with reply_timeout gets no reply within it (or within quic.reply_timeout
// if that is shorter), is a failure of u.
func (h *Handler) awaitReply(conn *net.UDPConn, u *Upstream, reply sendSide) {
	start := time.Now()
	timeout := time.Duration(h.QUIC.ReplyTimeout)
	hc := h.HealthChecks
	passive := hc != nil && hc.Passive != nil
	watch := time.Duration(0) // when no reply is a passive failure
	if passive && hc.replyTimeout > 0 {
		watch = min(hc.replyTimeout, timeout)
		_ = conn.SetReadDeadline(start.Add(watch))
	} else {
		_ = conn.SetReadDeadline(start.Add(timeout))
	}
	buf := udpReplyBuffers.Get().(*[1 << 16]byte)
	defer udpReplyBuffers.Put(buf)
	for {
		m, err := conn.Read(buf[:])
		if err == nil {
			u.host.quic.bytesDown.Add(uint64(m))
			u.host.datagramsReceived.Add(1)
			u.host.bytesReceived.Add(uint64(m))
			if _, err := reply.Write(buf[:m]); err == nil {
				_ = reply.Close()
			}
			return
		}
		var errno syscall.Errno
		switch {
		case watch > 0 && errors.Is(err, os.ErrDeadlineExceeded):
			reason := hc.noReply
			if watch < hc.replyTimeout {
				reason = "no reply within quic.reply_timeout " + watch.String()
			}
			h.passiveFailure(u, reason)
			if watch < timeout {
				watch = 0
				_ = conn.SetReadDeadline(start.Add(timeout))
				continue // a late reply still goes back
			}
		case errors.As(err, &errno) && (errno == syscall.ECONNREFUSED || errno == syscall.EHOSTUNREACH || errno == syscall.ENETUNREACH):
			if passive {
				h.passiveFailure(u, probeErrorReason("reading the reply", err))
			}
		case !errors.Is(err, os.ErrDeadlineExceeded):
			reply.CancelWrite(QUICErrStreamRelay)
			return
		}
		reply.CancelWrite(QUICErrReplyTimeout) // no reply, or none to come
		return
	}
}

// udpReplyBuffers holds the buffers of udp/ replies: any UDP datagram
// fits.
var udpReplyBuffers = sync.Pool{New: func() any { return new([1 << 16]byte) }}

// datagramsUp sends each DATAGRAM frame of the connection as a datagram
// upstream, from the connection's socket of the upstream's family; once the
// connection ends, it closes the sockets.
func (r *udpRelay) datagramsUp() {
	var socks [2]dgramSocket // IPv6, IPv4
	var down sync.WaitGroup  // the sockets' readers
	defer down.Wait()
	defer func() {
		for _, s := range socks {
			if s.conn != nil {
				_ = s.conn.Close()
			}
		}
	}()
	ctx := r.c.Context()
	for {
		b, err := r.c.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		h, u := r.pick()
		if u == nil {
			if h != nil {
				h.drop(dropNoUpstream)
			}
			continue
		}
		conn := r.datagramSocket(&socks, &down, h, u)
		if conn == nil {
			continue
		}
		if _, err := conn.WriteToUDPAddrPort(b, u.addr); err != nil {
			h.drop(dropWriteError)
			continue
		}
		u.host.datagramsSent.Add(1)
		u.host.bytesSent.Add(uint64(len(b)))
	}
}

// dgramSocket is a connection's DATAGRAM socket of one address family,
// with the settings it was opened with.
type dgramSocket struct {
	conn       *net.UDPConn
	local      netip.Addr // none: the kernel's choice
	rbuf, wbuf int        // read_buffer, write_buffer
}

// datagramSocket returns the socket of socks for DATAGRAM frames to u,
// h's upstream: opened through h on first use, and opened anew when h
// wants another local address or other buffer sizes than the one open,
// whose replies in flight are then lost. Each socket's replies are read by
// datagramsDown, counted in down; nil when no socket can be opened.
func (r *udpRelay) datagramSocket(socks *[2]dgramSocket, down *sync.WaitGroup, h *Handler, u *Upstream) *net.UDPConn {
	s, network := &socks[0], "udp6"
	if u.addr.Addr().Unmap().Is4() {
		s, network = &socks[1], "udp4"
	}
	want := dgramSocket{local: r.local(h, u.addr), rbuf: h.ReadBuffer, wbuf: h.WriteBuffer}
	if s.conn != nil {
		if s.local == want.local && s.rbuf == want.rbuf && s.wbuf == want.wbuf {
			return s.conn
		}
		_ = s.conn.Close()
		s.conn = nil
	}
	conn, err := h.udpSocket(network, want.local, netip.AddrPort{})
	if err != nil {
		h.drop(dropSocketUnavailable)
		h.warnOnce(dropSocketUnavailable, "cannot open a socket for DATAGRAM frames to udp/ upstreams",
			zap.String("network", network), zap.Error(err))
		return nil
	}
	want.conn = conn
	*s = want
	down.Go(func() { r.datagramsDown(conn) })
	return conn
}

// datagramsDown sends each datagram from an upstream of the current
// handler to the connection as a DATAGRAM frame.
func (r *udpRelay) datagramsDown(conn *net.UDPConn) {
	buf := make([]byte, maxUDPPayload)
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		h := r.t.cur.Load()
		u := h.byAddr[addrPortUnmap(from)]
		if u == nil || !h.QUIC.udp {
			h.drop(dropUnknownSource)
			continue
		}
		u.host.datagramsReceived.Add(1)
		u.host.bytesReceived.Add(uint64(n))
		_ = r.c.SendDatagram(buf[:n])
	}
}
