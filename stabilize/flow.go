package stabilize

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// Flow is one client flow: the datagrams of one client address and port,
// from the first until it has been idle for caddy-l4's idle timeout. It owns
// one upstream-facing UDP socket, which lets replies find their client; a
// reply reactor (reply_linux.go) relays the replies out of the listener's
// socket. On a fastudp listener the flow is the client's fastudp.Endpoint.
type Flow struct {
	// Read or written for every datagram: the forward path's first, then
	// the reply path's (replyState), so that a datagram of a flow whose
	// memory has gone cold from the CPU's cache misses on few lines.

	mu sync.Mutex // serialises forward
	// h is the flow's handler. A reload may move the flow to the next
	// config's handler (moveTo), with mu and replyMu held; read it with
	// either held.
	h          *Handler
	lastActive atomic.Int64 // unix nanos of the latest datagram through the fast socket
	upstream   *Upstream    // per flow: the flow's upstream
	cids       *cidTable    // per connection: the listener's table; set with mu and replyMu held
	send       udpio.Sender // sends on conn without blocking
	header     []byte       // PROXY protocol header, sent before every datagram
	closed     atomic.Bool
	connection            // the socket's source and upstream; see sourceports.go
	health     flowHealth // reply_timeout and socket error state; see health_passive.go
	replyState            // see reply_*.go
	client     netip.AddrPort
	out        *net.UDPConn // the listener's socket, for replies; nil: through cx

	cx          atomic.Pointer[layer4.Connection] // nil once the fast socket keeps the flow
	conn        upstreamConn                      // upstream-facing; sourceports_*.go
	fast        *fastudp.Socket                   // the fastudp socket the flow arrived on, or nil
	listener    netip.AddrPort                    // the listener's address
	dst         netip.Addr                        // under mu: the host address the client sent to, if known; see setDst
	id          uint64                            // names the flow in the affinity table
	idleTimeout atomic.Int64                      // nanoseconds: caddy-l4's, of the flow's listener in its handler's config
	req         Request                           // what the policy picks for
	lbScratch   quiclb.Scratch                    // per connection: QUIC-LB decodes without a pool
	detached    atomic.Bool                       // the socket's reaper, not Handle, ends the flow
	handling    atomic.Bool                       // Handle is reading the flow
	closeOnce   sync.Once
}

// flowIDs numbers flows.
var flowIDs atomic.Uint64

// Client is the client's address and port.
func (fl *Flow) Client() netip.AddrPort { return fl.client }

// newFlow opens the flow of client, an unmapped address and port, or
// refuses it (logged once per handler and reason) and says why.
func (h *Handler) newFlow(cx *layer4.Connection, client netip.AddrPort) (*Flow, dropReason) {
	if !h.admit(client.Addr()) {
		h.warnOnce(dropFlowLimit, "refusing new flows over the limit",
			zap.Stringer("client", client), zap.Int("max_flows", h.maxFlows), zap.Int("max_flows_per_ip", h.MaxFlowsPerIP))
		return nil, dropFlowLimit
	}
	fl, err := h.openFlow(cx, client)
	if err != nil {
		h.unadmit(client.Addr())
		h.warnOnce(dropSocketUnavailable, "refusing new flows: opening an upstream socket failed",
			zap.Stringer("client", client), zap.Error(err))
		return nil, dropSocketUnavailable
	}
	return fl, 0
}

func (h *Handler) openFlow(cx *layer4.Connection, client netip.AddrPort) (*Flow, error) {
	conn, connects, err := h.upstreamSocket() // sourceports.go
	if err != nil {
		return nil, err
	}
	if err := h.prepareSocket(conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	front, out := listenerOf(cx)
	h.warnWildcard(front, cx)
	if out == nil && !h.warnedListener.Swap(true) {
		h.logger.Warn("replies go through caddy-l4's blocking cx.Write: the listener's socket is out of reach",
			zap.Stringer("listener", cx.LocalAddr()))
	}
	li, err := h.listenerInfo(front, out, cx.LocalAddr())
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	fl := &Flow{
		h:        h,
		client:   client,
		conn:     conn,
		out:      out,
		listener: addrPort(cx.LocalAddr()),
		id:       flowIDs.Add(1),
		req:      Request{Client: client, cx: cx},
	}
	if r, ok := h.router.(*perConnectionRouter); ok {
		fl.cids = r.table(fl.listener)
	}
	fl.send.Init(conn)
	fl.cx.Store(cx)
	fl.connection.connects = connects
	if front != nil {
		fl.fast = front.Socket()
		fl.dst = fl.fast.Dst(client)
		fl.setReplySrc(fl.dst)
	}
	fl.idleTimeout.Store(int64(li.idle))
	fl.header = h.proxyHeader(fl)
	if err := fl.startReplies(li); err != nil {
		fl.stopReplies()
		return nil, err
	}
	if h.affinity != nil {
		// The router applies the health rule on the first datagram.
		if addr, ok := h.affinity.lookup(fl.affinityKey()); ok && h.byAddr[addr] != nil {
			fl.assign(h.byAddr[addr])
		}
	}
	h.mu.Lock()
	h.flows[fl] = struct{}{}
	h.mu.Unlock()
	if fl.fast != nil {
		fl.lastActive.Store(time.Now().UnixNano())
		fl.fast.Register(client, fl)
	}
	return fl, nil
}

// listenerInfo is what the flows of a handler on one listener share, found
// for the first and kept for the others.
type listenerInfo struct {
	idle      time.Duration   // the listener's idle timeout in h's config
	outRC     syscall.RawConn // of the listener's socket, if known
	outFamily int             // of the listener's socket, if known
}

type listenerKey struct {
	network string
	addr    netip.AddrPort
	out     *net.UDPConn
}

// listenerInfo returns what h's flows on a listener share: front and out
// are the listener's (listenerOf) and local its address.
func (h *Handler) listenerInfo(front *fastudp.Front, out *net.UDPConn, local net.Addr) (*listenerInfo, error) {
	k := listenerKey{listenerNetwork(front), addrPort(local), out}
	h.mu.Lock()
	li := h.listeners[k]
	h.mu.Unlock()
	if li != nil {
		return li, nil
	}
	li = &listenerInfo{idle: h.listenerIdleTimeout(k.network, local)}
	if out != nil && front == nil {
		h.growListener(out, local) // listener.go
	}
	if out != nil {
		rc, err := out.SyscallConn()
		if err != nil {
			return nil, err
		}
		li.outRC, li.outFamily = rc, udpio.Family(rc)
	}
	h.mu.Lock()
	if h.listeners == nil {
		h.listeners = make(map[listenerKey]*listenerInfo)
	}
	h.listeners[k] = li
	h.mu.Unlock()
	return li, nil
}

// proxyHeader is the PROXY protocol header h sends before each of fl's
// datagrams, or nil. Its destination is the address the client sent to
// where the listener's address is unspecified and the socket tells it
// (fastudp/), else the listener's.
func (h *Handler) proxyHeader(fl *Flow) []byte {
	if h.ProxyProtocol != "v2" {
		return nil
	}
	dst := fl.listener
	if fl.dst.IsValid() {
		dst = netip.AddrPortFrom(fl.dst, dst.Port())
	}
	return appendProxyV2(nil, fl.client, dst)
}

// setDst makes dst, the host address that the client's latest datagram
// was sent to, when it changes, the flow's: the source of its replies and
// its PROXY header's destination. fl.mu is held.
func (fl *Flow) setDst(dst netip.Addr) {
	fl.dst = dst
	fl.replyMu.Lock()
	fl.setReplySrc(dst)
	fl.replyMu.Unlock()
	if len(fl.header) > 0 {
		fl.header = fl.h.proxyHeader(fl)
	}
}

// warnWildcard warns once per handler that replies on a udp/ listener
// bound to an unspecified address leave from the address the kernel's
// route picks, not necessarily the one the client sent to: caddy-l4 reads
// the listener without the control messages that tell it (fastudp/ reads
// them). front and cx are a flow's (listenerOf).
func (h *Handler) warnWildcard(front *fastudp.Front, cx *layer4.Connection) {
	if front != nil || h.warnedWild.Load() || !addrPort(cx.LocalAddr()).Addr().IsUnspecified() {
		return
	}
	if !h.warnedWild.Swap(true) {
		h.logger.Warn("replies leave from the address the route picks, which may not be the one the client sent to: the udp/ listener is bound to an unspecified address; listen on fastudp/ or on each address",
			zap.Stringer("listener", cx.LocalAddr()))
	}
}

// handler returns the flow's handler.
func (fl *Flow) handler() *Handler {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	return fl.h
}

// assign moves the flow to u. fl.mu is held, or the flow is new.
func (fl *Flow) assign(u *Upstream) {
	if fl.upstream != nil {
		fl.upstream.host.flows.Add(-1)
	}
	fl.upstream = u
	u.host.flows.Add(1)
	if a := fl.h.affinity; a != nil {
		a.set(fl.affinityKey(), u.addr, fl.id)
	}
}

// idle is the flow's idle timeout.
func (fl *Flow) idle() time.Duration { return time.Duration(fl.idleTimeout.Load()) }

// affinityKey names the flow in the affinity table.
func (fl *Flow) affinityKey() affinityKey {
	return affinityKey{listener: fl.listener, client: fl.client}
}

// reply checks a datagram b read from the flow's socket and returns the
// upstream that sent it, or nil when it is dropped. replyMu is held.
func (fl *Flow) reply(from netip.AddrPort, b []byte, truncated bool) *Upstream {
	h := fl.h
	if truncated {
		h.drop(dropReplyTooLarge)
		if u := h.byAddr[from]; u != nil {
			fl.replyTooLarge(u)
		}
		return nil
	}
	u := h.byAddr[from]
	if u == nil {
		h.drop(dropUnknownSource)
		return nil
	}
	u.host.datagramsReceived.Add(1)
	u.host.bytesReceived.Add(uint64(len(b)))
	fl.replyFrom(u)
	if h.observer != nil {
		h.observer.observeReply(fl, u, b)
	}
	return u
}

// Deliver forwards a datagram that bypassed caddy-l4 (fastudp.Endpoint).
func (fl *Flow) Deliver(d fastudp.Datagram, now int64) {
	fl.lastActive.Store(now)
	ds := [1]fastudp.Datagram{d}
	fl.forwardBatch(ds[:])
}

// DeliverBatch forwards datagrams that bypassed caddy-l4, several of one
// read batch at once (fastudp.BatchEndpoint).
func (fl *Flow) DeliverBatch(ds []fastudp.Datagram, now int64) {
	fl.lastActive.Store(now)
	fl.forwardBatch(ds)
}

// Warm loads what forwarding a datagram reads of the flow and its socket
// into the CPU's cache (fastudp.Warmer): a load in each cache line of the
// fields from h to connection, wherever the object starts in a line.
func (fl *Flow) Warm() {
	fl.lastActive.Load()
	fl.closed.Load()
	fl.health.since.Load()
	fl.send.Warm()
}

// Expired reports whether the flow, left to its fast socket, has been idle
// for its listener's idle timeout (fastudp.Endpoint).
func (fl *Flow) Expired(now int64) bool {
	return fl.detached.Load() && now-fl.lastActive.Load() > fl.idleTimeout.Load()
}

// Close ends the flow (fastudp.Endpoint).
func (fl *Flow) Close() { fl.close() }

// detach hands a fast flow that is still active to its socket's reaper when
// Handle stops waiting for it, because its datagrams bypass caddy-l4. It
// reports whether it did.
func (fl *Flow) detach() bool {
	if fl.fast == nil || time.Now().UnixNano()-fl.lastActive.Load() >= fl.idleTimeout.Load() {
		return false
	}
	fl.detached.Store(true)
	fl.releaseConn()
	if h := fl.handler(); h.closing.Load() {
		// Cleanup may have missed it. Only as h's: a Cleanup may have
		// moved it on since.
		fl.closeFor(h)
	}
	return true
}

// wakeHandle ends Handle's wait for the flow's next datagram. A read
// deadline only touches caddy-l4's packetConn, never the shared socket.
func (fl *Flow) wakeHandle() {
	if cx := fl.cx.Load(); cx != nil && fl.handling.Load() {
		_ = cx.SetReadDeadline(time.Unix(1, 0))
	}
}

// releaseConn lets go of caddy-l4's connection once the fast socket keeps
// the flow: it holds kilobytes (buffers, timers, a replacer) that a
// handed-off flow never uses again. A key the policy hashes is settled
// first, since placeholders are expanded with the connection.
func (fl *Flow) releaseConn() {
	fl.mu.Lock()
	fl.req.settle(fl.h.selector)
	fl.mu.Unlock()
	fl.cx.Store(nil)
}

// closeSocket stops the replies and closes the flow's socket; it is safe to
// call more than once.
func (fl *Flow) closeSocket() {
	fl.closeOnce.Do(fl.stopReplies)
}

// close ends the flow and releases its socket and upstream; it is safe to
// call more than once.
func (fl *Flow) close() { fl.closeFor(nil) }

// closeFor closes the flow if owner is its handler, or whoever its handler
// is when owner is nil. The check and the closing are one step under fl.mu,
// so a flow that a reload moves on is never closed by its old handler.
func (fl *Flow) closeFor(owner *Handler) {
	fl.mu.Lock()
	if owner != nil && fl.h != owner || !fl.closed.CompareAndSwap(false, true) {
		fl.mu.Unlock()
		return
	}
	h, u := fl.h, fl.upstream
	fl.upstream = nil
	fl.mu.Unlock()
	if fl.fast != nil {
		fl.fast.Unregister(fl.client, fl)
	}
	fl.closeSocket()
	fl.mu.Lock()
	fl.releaseSource() // once the socket has let go of the port
	fl.mu.Unlock()
	if u != nil {
		u.host.flows.Add(-1)
		if h.affinity != nil {
			// After Cleanup the flow continues in the next handler
			// instance, which looks its upstream up.
			h.affinity.release(fl.affinityKey(), fl.id, h.closing.Load(), fl.idle())
		}
	}
	h.forget(fl)
}

// moveTo hands the flow to to, the next config's handler of the same
// identity that serves its listener (Handler.successor), keeping its
// sockets (set up as to's) under to's idle timeout:
// only fast flows, whose listener socket outlives the reload, and only
// when to has the flow's upstream. It reports whether it did.
func (fl *Flow) moveTo(to *Handler) bool {
	if fl.fast == nil {
		return false
	}
	fl.mu.Lock()
	defer fl.mu.Unlock()
	fl.replyMu.Lock()
	defer fl.replyMu.Unlock()
	if fl.closed.Load() || to.network != fl.h.network || !fl.fast.Open() {
		return false
	}
	var u *Upstream
	if fl.upstream != nil {
		if u = to.byAddr[fl.upstream.addr]; u == nil {
			return false
		}
	}
	// The socket takes to's settings: its buffer sizes, and ICMP error
	// reports if to has passive checks.
	if to.prepareSocket(fl.conn) != nil || !to.adopt(fl) {
		return false
	}
	fl.h, fl.upstream = to, u // the same address shares one Host
	if r, ok := to.router.(*perConnectionRouter); ok {
		fl.cids = r.table(fl.listener) // the same table, now held by to too
	}
	fl.header = to.proxyHeader(fl)
	// to's config's idle timeout, that of the listener the flow stays on.
	idle, _ := to.serverIdleTimeout(FastNetwork, fl.listener)
	fl.idleTimeout.Store(int64(idle))
	fl.health.since.Store(0) // to has a reply_timeout clock of its own
	fl.health.upstream.Store(nil)
	fl.detached.Store(true) // Handle returns; the reaper ends the flow
	return true
}

// addrPort is the address and port of a UDP address, unmapped.
func addrPort(a net.Addr) netip.AddrPort {
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	return udpio.Unmap(ua.AddrPort())
}

// Interface guards
var (
	_ fastudp.BatchEndpoint = (*Flow)(nil)
	_ fastudp.Warmer        = (*Flow)(nil)
)
