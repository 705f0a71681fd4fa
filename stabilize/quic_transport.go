package stabilize

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/quic-go/quic-go"
	"go.uber.org/zap"
)

// quicTransport is the one terminating quic.Transport of a listener, fed by
// every flow of the handlers that terminate QUIC on it. It lives in a
// UsagePool, keyed by the listener, so a config reload keeps its
// connections: the handler that serves the listener (cur) picks the
// upstreams and TLS config of new connections; connections already relayed
// go on.
//
// Which handler serves a listener only its flows tell: a handler claims
// the transport when caddy-l4 hands it a flow of the listener
// (transportFor), unless a handler of a newer config has. A handler that is
// cleaned up passes its claim to its likeliest successor on the listener
// (quicSuccessor), which serves the transport until a flow arrives. Unless
// the successor is the one new handler of the same config, on fastudp/ the
// clients' endpoints then expire (quicConn.unclaimed), so that their next
// datagrams pass through caddy-l4 and claim it; on udp/ the first datagram
// through the new config's socket does.
type quicTransport struct {
	key  string
	conn *quicConn
	tr   *quic.Transport
	ln   *quic.EarlyListener
	cur  atomic.Pointer[Handler]
	done chan struct{} // the accept loop has returned
}

// quicTransports holds the terminating transports, by listener.
var quicTransports = caddy.NewUsagePool()

// quicLive is the live handlers with a quic block, oldest first: those a
// handler's transports may pass to when it is cleaned up (quicSuccessor).
var quicLive = struct {
	sync.Mutex
	hs []*Handler
}{}

// quicHolds is the transports a handler holds a reference to, by key, and
// the caddy-l4 flows its Handle is reading.
type quicHolds struct {
	mu    sync.Mutex
	m     map[string]*quicTransport
	flows map[*layer4.Connection]struct{}
	seq   uint64 // the order of quicJoin: a newer config's handlers have higher ones
	conf  string // the handler's config, as JSON: a successor with the same serves the same
}

// quicSeq numbers the QUIC handlers in the order they are provisioned.
var quicSeq atomic.Uint64

// transportFor returns the transport of cx's listener, opening it on the
// first flow, and has h claim it.
func (h *Handler) transportFor(cx *layer4.Connection, network string, out *net.UDPConn) (*quicTransport, error) {
	key := network + "/" + cx.LocalAddr().String()
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m == nil {
		return nil, errQUICHandlerGone
	}
	h.quicHeld.flows[cx] = struct{}{}
	if t := h.quicHeld.m[key]; t != nil {
		t.claim(h)
		if out != nil {
			t.conn.setOut(out, network == "udp") // a udp/ listener's socket changes on reloads
		}
		return t, nil
	}
	v, _, err := quicTransports.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newQUICTransport(key, cx.LocalAddr(), out, h)
	})
	if err != nil {
		delete(h.quicHeld.flows, cx)
		return nil, err
	}
	t := v.(*quicTransport)
	t.claim(h)
	if out != nil {
		t.conn.setOut(out, network == "udp")
	}
	h.quicHeld.m[key] = t
	return t, nil
}

// claim makes h, which a flow of the listener has reached, the handler of
// t's new connections, unless a live handler of a newer config is: during a
// reload both configs' listeners take flows for a moment.
func (t *quicTransport) claim(h *Handler) {
	for {
		cur := t.cur.Load()
		if cur == h {
			break
		}
		if cur != nil && cur.ctx.Context != h.ctx.Context && cur.quicHeld.seq > h.quicHeld.seq && !cur.closing.Load() {
			return
		}
		if t.cur.CompareAndSwap(cur, h) {
			break
		}
	}
	t.conn.unclaimed.Store(false)
}

// errQUICHandlerGone: a flow reached a handler already cleaned up.
var errQUICHandlerGone = errors.New("the handler has been cleaned up")

// newQUICTransport opens a transport on a quicConn that writes out of out
// and starts accepting connections.
func newQUICTransport(key string, local net.Addr, out *net.UDPConn, h *Handler) (*quicTransport, error) {
	if out == nil {
		return nil, errors.New("QUIC termination needs a udp/ or fastudp/ listener")
	}
	conn, err := newQUICConn(local, out)
	if err != nil {
		return nil, fmt.Errorf("QUIC termination on %s: %w", key, err)
	}
	t := &quicTransport{key: key, conn: conn, done: make(chan struct{})}
	t.cur.Store(h)
	t.tr = &quic.Transport{
		Conn: t.conn,
		VerifySourceAddress: func(net.Addr) bool {
			if h := t.cur.Load(); h != nil && h.QUIC.StatelessRetry {
				h.QUIC.stats.retries.Add(1)
				return true
			}
			return false
		},
	}
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			return t.cur.Load().QUIC.configForClient(hello)
		},
	}
	conf := &quic.Config{
		EnableDatagrams: true,
		Allow0RTT:       true, // each client's config decides
		GetConfigForClient: func(*quic.ClientInfo) (*quic.Config, error) {
			return t.cur.Load().QUIC.config, nil
		},
	}
	ln, err := t.tr.ListenEarly(tlsConf, conf)
	if err != nil {
		_ = t.conn.Close()
		return nil, fmt.Errorf("listening for QUIC on %s: %w", key, err)
	}
	t.ln = ln
	go t.accept()
	return t, nil
}

// accept hands each new connection to the current handler.
func (t *quicTransport) accept() {
	defer close(t.done)
	for {
		c, err := t.ln.Accept(context.Background())
		if err != nil {
			return
		}
		h := t.cur.Load()
		go h.serveQUIC(t, c)
	}
}

// Destruct closes the transport and its connections.
func (t *quicTransport) Destruct() error {
	_ = t.ln.Close()
	err := t.tr.Close()
	_ = t.conn.Close()
	<-t.done
	return err
}

// handleQUIC feeds a client flow to the listener's terminating transport
// until caddy-l4 ends the flow; on a fastudp listener the client's later
// datagrams bypass caddy-l4 to the transport.
func (h *Handler) handleQUIC(cx *layer4.Connection) error {
	client := addrPort(cx.RemoteAddr())
	front, out := listenerOf(cx)
	network := listenerNetwork(front)
	t, err := h.transportFor(cx, network, out)
	if errors.Is(err, errQUICHandlerGone) {
		return nil // the next config's handler takes the client's next datagram
	}
	if err != nil {
		h.warnOnce(dropSocketUnavailable, "cannot terminate QUIC", zap.Error(err))
		h.refuse(cx, dropSocketUnavailable)
		return nil
	}
	defer h.forgetQUICFlow(cx)
	idle := h.listenerIdleTimeout(network, cx.LocalAddr())
	if front != nil {
		ep := &quicEndpoint{
			conn:   t.conn,
			sock:   front.Socket(),
			client: client,
			idle:   idle,
		}
		ep.lastActive.Store(time.Now().UnixNano())
		ep.sock.Register(client, ep)
	}
	for first := true; ; first = false {
		h.readDeadline(cx, front != nil, first) // handle.go
		p := quicPacketPool.Get().(*quicPacket)
		start := time.Now()
		n, err := cx.Read(p.buf[:])
		if err != nil || n == 0 {
			quicPacketPool.Put(p)
			if err != nil && !emptyDatagram(err, time.Since(start), idle) {
				return nil
			}
			continue // an empty datagram is no QUIC packet
		}
		p.n, p.from = n, client
		if out != nil {
			t.conn.setOut(out, front == nil)
		}
		t.conn.push(p)
	}
}

// forgetQUICFlow drops a flow whose Handle returns.
func (h *Handler) forgetQUICFlow(cx *layer4.Connection) {
	h.quicHeld.mu.Lock()
	delete(h.quicHeld.flows, cx)
	h.quicHeld.mu.Unlock()
}

// quicJoin records h as a live QUIC handler.
func (h *Handler) quicJoin() {
	h.quicHeld.m = make(map[string]*quicTransport)
	h.quicHeld.flows = make(map[*layer4.Connection]struct{})
	h.quicHeld.seq = quicSeq.Add(1)
	if conf, err := json.Marshal(h); err == nil {
		h.quicHeld.conf = string(conf)
	}
	quicLive.Lock()
	quicLive.hs = append(quicLive.hs, h)
	quicLive.Unlock()
}

// quicLeave passes each of h's transports to its successor on the
// listener (quicSuccessor), or releases it.
func (h *Handler) quicLeave() {
	quicLive.Lock()
	quicLive.hs = slices.DeleteFunc(quicLive.hs, func(g *Handler) bool { return g == h })
	quicLive.Unlock()
	h.quicHeld.mu.Lock()
	held := h.quicHeld.m
	h.quicHeld.m = nil
	for cx := range h.quicHeld.flows {
		// End Handle's wait, as for balanced flows: caddy-l4 waits for
		// it before the reload goes on. The client's next datagram
		// reaches the next config, and the same transport.
		_ = cx.SetReadDeadline(time.Unix(1, 0))
	}
	h.quicHeld.mu.Unlock()
	for key, t := range held {
		t.conn.listenerGone() // caddy-l4 has closed this config's listeners
		next, sure := h.quicSuccessor(key)
		if next == nil || !next.adoptTransport(key, t) {
			_, _ = quicTransports.Delete(key) // next holds a reference of its own, or none is left
		}
		// Unless a newer handler has claimed it, next serves it; if it
		// may not be the listener's, until a flow of the listener tells.
		if next != nil && t.cur.CompareAndSwap(h, next) && !sure {
			t.conn.unclaimed.Store(true)
		}
	}
	h.QUIC.cleanup()
}

// quicSuccessor returns the handler likeliest to serve the listener of
// h's transport at key after h: of the live QUIC handlers whose config
// listens on key, the one with h's config, else the one that shares the
// most upstreams with h, then has its identity, the newest of equals; nil
// if none. sure says it is the only one with h's config. (A handler that a
// flow of the listener has reached has claimed the transport already.)
func (h *Handler) quicSuccessor(key string) (next *Handler, sure bool) {
	quicLive.Lock()
	hs := slices.Clone(quicLive.hs)
	quicLive.Unlock()
	best, same := -1, 0
	for _, g := range hs {
		if g.ctx.Err() != nil || !g.listensOn(key) {
			continue // a config that is going away, as h's is
		}
		score := 0
		for addr := range h.byAddr {
			if g.byAddr[addr] != nil {
				score += 2
			}
		}
		if g.identity == h.identity {
			score++
		}
		if h.quicHeld.conf != "" && g.quicHeld.conf == h.quicHeld.conf {
			score += 1 << 20
			same++
		}
		if score >= best {
			next, best = g, score
		}
	}
	return next, same == 1
}

// adoptTransport takes over a reference to t, unless h holds one already.
func (h *Handler) adoptTransport(key string, t *quicTransport) bool {
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m == nil {
		return false // cleaned up meanwhile
	}
	if _, ok := h.quicHeld.m[key]; ok {
		return false
	}
	h.quicHeld.m[key] = t
	return true
}

// listensOn reports whether h's config has a layer4 server listening at
// key, a transport's network/address.
func (h *Handler) listensOn(key string) bool {
	network, addr, _ := strings.Cut(key, "/")
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return false
	}
	_, found := h.serverIdleTimeout(network, ap)
	return found
}

// Interface guards
var _ caddy.Destructor = (*quicTransport)(nil)
