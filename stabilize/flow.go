package stabilize

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// Flow is one client flow: the datagrams of one client address and port,
// from the first until it has been idle for caddy-l4's idle timeout. It owns
// one upstream-facing UDP socket, which lets replies find their client; a
// reply reactor (reply_linux.go) relays the replies.
type Flow struct {
	h      *Handler
	cx     *layer4.Connection
	client netip.AddrPort
	conn   *net.UDPConn

	// upstream is the flow's upstream in `per flow` mode, guarded by mu.
	upstream *Upstream

	header      []byte      // PROXY protocol header, sent before every datagram
	affinityKey affinityKey // per flow only

	// Hash is a policy's per-flow key hash, computed once under mu. Hashed
	// says it has been computed.
	Hash   uint64
	Hashed bool

	// Flows on a fast socket: their datagrams bypass caddy-l4 once
	// established, and replies go out through the socket directly.
	fast        *fastSocket
	lastActive  atomic.Int64  // unix nanos of the latest bypassed datagram
	detached    atomic.Bool   // Handle has returned; the socket's reaper ends the flow
	idleTimeout time.Duration // caddy-l4's, as measured by Handle

	mu         sync.Mutex // serialises forward
	replyState            // see reply_*.go
	closeOnce  sync.Once
	closed     atomic.Bool

	health flowHealth // reply_timeout and socket error state; see health_passive.go
}

// Client is the client's address and port.
func (fl *Flow) Client() netip.AddrPort { return fl.client }

// Conn is the client connection from caddy-l4.
func (fl *Flow) Conn() *layer4.Connection { return fl.cx }

// newFlow opens the flow of client, an unmapped address and port.
func (h *Handler) newFlow(cx *layer4.Connection, client netip.AddrPort) (*Flow, error) {
	conn, err := net.ListenUDP(h.network, nil)
	if err != nil {
		return nil, err
	}
	if err := h.prepareSocket(conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	fl := &Flow{h: h, cx: cx, client: client, conn: conn}
	if err := fl.startReplies(); err != nil {
		fl.stopReplies()
		return nil, err
	}
	listener := addrPort(cx.LocalAddr())
	fl.fast = fastSocketFor(cx.LocalAddr())
	if h.ProxyProtocol == "v2" {
		fl.header = appendProxyV2(nil, fl.client, listener)
	}
	if h.affinity != nil {
		fl.affinityKey = affinityKey{listener: listener, client: fl.client}
		if addr, ok := h.affinity.lookup(fl.affinityKey); ok {
			if u := h.byAddr[addr]; u != nil && u.healthy() {
				fl.assign(u)
			}
		}
	}
	h.mu.Lock()
	h.flows[fl] = struct{}{}
	h.mu.Unlock()
	if fl.fast != nil {
		fl.lastActive.Store(time.Now().UnixNano())
		fl.fast.register(fl)
	}
	return fl, nil
}

// forward sends one client datagram to the upstream the policy picks.
func (fl *Flow) forward(b []byte) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	u := fl.upstream
	if u == nil || !fl.h.perFlow || !u.healthy() && len(fl.h.available().Upstreams) > 0 {
		u = fl.h.pick(fl)
		if u == nil {
			fl.h.drop(dropNoUpstream)
			return
		}
		if fl.h.perFlow {
			fl.assign(u)
		}
	}
	fl.sentTo(u) // before the send, which a reply may overtake
	if _, err := fl.conn.WriteToUDPAddrPort(b, u.addr); err != nil {
		fl.h.drop(dropWriteError)
		return
	}
	u.host.datagramsSent.Add(1)
	u.host.bytesSent.Add(uint64(len(b)))
}

// assign moves the flow to u.
func (fl *Flow) assign(u *Upstream) {
	if fl.upstream != nil {
		fl.upstream.host.flows.Add(-1)
	}
	fl.upstream = u
	u.host.flows.Add(1)
	if fl.h.affinity != nil {
		fl.h.affinity.set(fl.affinityKey, u.addr, fl)
	}
}

// reply checks a datagram read from the flow's socket and returns the
// upstream that sent it, or nil when it is dropped.
func (fl *Flow) reply(from netip.AddrPort, n int, truncated bool) *Upstream {
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
	u.host.bytesReceived.Add(uint64(n))
	fl.replyFrom(u)
	return u
}

// writeToClient sends one reply to the client. Only the flow's reply path
// calls it, so writes to cx are serialised.
func (fl *Flow) writeToClient(b []byte) {
	var err error
	if fl.fast != nil {
		_, err = fl.fast.conn.WriteToUDPAddrPort(b, fl.client)
	} else {
		_, err = fl.cx.Write(b)
	}
	if err != nil {
		fl.h.drop(dropWriteError)
	}
}

// detach hands a fast flow that is still active to its socket's reaper when
// caddy-l4 ends the flow after idleTimeout, because its datagrams bypassed
// caddy-l4. It reports whether it did.
func (fl *Flow) detach(idleTimeout time.Duration) bool {
	if fl.fast == nil || time.Now().UnixNano()-fl.lastActive.Load() >= int64(idleTimeout) {
		return false
	}
	fl.idleTimeout = idleTimeout
	fl.detached.Store(true)
	if fl.h.closing.Load() {
		fl.close() // Cleanup may have missed it
	}
	return true
}

// closeSocket stops the replies and closes the flow's socket; it is safe to
// call more than once.
func (fl *Flow) closeSocket() {
	fl.closeOnce.Do(fl.stopReplies)
}

// close ends the flow and releases its socket, goroutine and upstream; it
// is safe to call more than once.
func (fl *Flow) close() {
	if !fl.closed.CompareAndSwap(false, true) {
		return
	}
	if fl.fast != nil {
		fl.fast.unregister(fl)
	}
	fl.closeSocket()
	if fl.upstream != nil {
		fl.upstream.host.flows.Add(-1)
		// After Cleanup the flow continues in the next handler instance.
		if fl.h.affinity != nil && !fl.h.closing.Load() {
			fl.h.affinity.forget(fl.affinityKey, fl)
		}
	}
	fl.h.mu.Lock()
	delete(fl.h.flows, fl)
	fl.h.mu.Unlock()
}

// addrPort is the address and port of a UDP address, unmapped.
func addrPort(a net.Addr) netip.AddrPort {
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
