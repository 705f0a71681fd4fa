package stabilize

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// Flow is one client flow: the datagrams of one client address and port,
// from the first until it has been idle for caddy-l4's idle timeout. It owns
// one upstream-facing UDP socket, which lets replies find their client, and
// one goroutine that relays the replies.
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

	mu        sync.Mutex // serialises forward
	replies   sync.WaitGroup
	closeOnce sync.Once
	closed    atomic.Bool

	health flowHealth // reply_timeout and socket error state; see healthchecks.go
}

// Client is the client's address and port.
func (fl *Flow) Client() netip.AddrPort { return fl.client }

// Conn is the client connection from caddy-l4.
func (fl *Flow) Conn() *layer4.Connection { return fl.cx }

func (h *Handler) newFlow(cx *layer4.Connection, client netip.AddrPort) (*Flow, error) {
	conn, err := net.ListenUDP(h.network, nil)
	if err != nil {
		return nil, err
	}
	if err := h.prepareSocket(conn); err != nil {
		_ = conn.Close()
		return nil, err
	}
	fl := &Flow{h: h, cx: cx, client: netip.AddrPortFrom(client.Addr().Unmap(), client.Port()), conn: conn}
	listener := addrPort(cx.LocalAddr())
	fl.fast = fastSocketFor(cx.LocalAddr())
	if h.ProxyProtocol == "v2" {
		fl.header = appendProxyV2(nil, fl.client, listener)
	}
	if h.affinity != nil {
		fl.affinityKey = affinityKey{listener: listener, client: fl.client}
		if addr, ok := h.affinity.lookup(fl.affinityKey); ok {
			if u := h.byAddr[addr]; u != nil && u.host.Healthy() {
				fl.assign(u)
			}
		}
	}
	h.mu.Lock()
	h.flows[fl] = struct{}{}
	h.mu.Unlock()
	fl.replies.Add(1)
	go fl.relayReplies()
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
	if u == nil || !fl.h.perFlow || !u.host.Healthy() && len(fl.h.available().Upstreams) > 0 {
		u = fl.h.pick(fl)
		if u == nil {
			fl.h.drop(dropNoUpstream)
			return
		}
		if fl.h.perFlow {
			fl.assign(u)
		}
	}
	if _, err := fl.conn.WriteToUDPAddrPort(b, u.addr); err != nil {
		fl.h.drop(dropWriteError)
		return
	}
	u.host.datagramsSent.Add(1)
	u.host.bytesSent.Add(uint64(len(b)))
	fl.sentTo(u)
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

// relayReplies writes the upstreams' replies to the client until the socket
// is closed. It is the flow's only writer to the client.
func (fl *Flow) relayReplies() {
	defer fl.replies.Done()
	h := fl.h
	buf := make([]byte, ListenerBufferSize)
	for {
		n, _, flags, from, err := fl.conn.ReadMsgUDPAddrPort(buf, nil)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			h.socketError(fl, err)
			continue
		}
		if flags&syscall.MSG_TRUNC != 0 {
			h.drop(dropReplyTooLarge)
			continue
		}
		u := h.byAddr[netip.AddrPortFrom(from.Addr().Unmap(), from.Port())]
		if u == nil {
			h.drop(dropUnknownSource)
			continue
		}
		u.host.datagramsReceived.Add(1)
		u.host.bytesReceived.Add(uint64(n))
		fl.replyFrom(u)
		if fl.fast != nil {
			_, err = fl.fast.conn.WriteToUDPAddrPort(buf[:n], fl.client)
		} else {
			_, err = fl.cx.Write(buf[:n])
		}
		if err != nil {
			h.drop(dropWriteError)
		}
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

// closeSocket ends the reply goroutine; it is safe to call more than once.
func (fl *Flow) closeSocket() {
	fl.closeOnce.Do(func() { _ = fl.conn.Close() })
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
	fl.replies.Wait()
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
