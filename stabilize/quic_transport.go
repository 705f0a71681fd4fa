package stabilize

import (
	"context"
	"crypto/tls"
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
// connections: the newest handler (cur) picks the upstreams and TLS config
// of new connections; connections already relayed go on.
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

// quicLive is the live handlers with a quic block, oldest first: a
// handler's transports pass to the newest other one when it is cleaned up.
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
}

// transportFor returns the transport of cx's listener, opening it on the
// first flow, and makes h the handler of its new connections.
func (h *Handler) transportFor(cx *layer4.Connection, network string, out *net.UDPConn) (*quicTransport, error) {
	key := network + "/" + cx.LocalAddr().String()
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m == nil {
		return nil, errQUICHandlerGone
	}
	h.quicHeld.flows[cx] = struct{}{}
	if t := h.quicHeld.m[key]; t != nil {
		t.cur.Store(h)
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
	t.cur.Store(h)
	if out != nil {
		t.conn.setOut(out, network == "udp")
	}
	h.quicHeld.m[key] = t
	return t, nil
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
	quicLive.Lock()
	quicLive.hs = append(quicLive.hs, h)
	quicLive.Unlock()
}

// quicLeave hands h's transports to the newest live QUIC handler of
// another config, which then serves their new connections, or releases
// them.
func (h *Handler) quicLeave() {
	quicLive.Lock()
	quicLive.hs = slices.DeleteFunc(quicLive.hs, func(g *Handler) bool { return g == h })
	var next *Handler
	for _, g := range slices.Backward(quicLive.hs) {
		if g.ctx.Context != h.ctx.Context && g.ctx.Err() == nil {
			next = g
			break
		}
	}
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
		if next != nil && next.listensOn(key) && next.adoptTransport(key, t) {
			continue
		}
		_, _ = quicTransports.Delete(key)
	}
	h.QUIC.cleanup()
}

// adoptTransport takes over a reference to t, unless h holds one already.
func (h *Handler) adoptTransport(key string, t *quicTransport) bool {
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m == nil {
		return false // cleaned up meanwhile
	}
	t.cur.Store(h)
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
