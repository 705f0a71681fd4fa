package stabilize

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
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
// (transportFor), unless a handler of a newer config has; when the new
// config has one layer4 server and one QUIC handler, that handler claims
// it at once (onlyQUICHandler). Else, when the handler that serves it is
// cleaned up, the transport waits for a claim (park):
// fastudp/ endpoints pass their clients' datagrams on to caddy-l4, so that
// the route of the listener's new config sees them first; on udp/ the held
// duplicate of the old listener socket goes on reading, so that the
// transport's connections go on, and new connections wait for a claim
// before their TLS config is chosen; a datagram of a flow that a live
// handler already reads claims it too (reclaim). If no handler claims the
// transport within the parking handler's idle timeout, or once no running
// config listens on its listener, it is released, and with it the held
// socket (watchPark).
type quicTransport struct {
	key  string
	conn *quicConn
	tr   *quic.Transport
	ln   *quic.EarlyListener
	cur  atomic.Pointer[Handler]
	done chan struct{} // the accept loop has returned
	stop chan struct{} // closed as Destruct begins

	mu      sync.Mutex
	claimed chan struct{} // while unclaimed: closed by the next claim
	parked  uint64        // while the cleaned-up cur's reference is kept: its park, else 0
}

// quicTransports holds the terminating transports, by listener.
var quicTransports = caddy.NewUsagePool()

// quicLive is the live handlers with a quic block.
var quicLive = struct {
	sync.Mutex
	hs map[*Handler]struct{}
}{hs: make(map[*Handler]struct{})}

// quicParks numbers the parks of transports.
var quicParks atomic.Uint64

// quicHolds is the transports a handler holds a reference to, by key, and
// the caddy-l4 flows its Handle is reading.
type quicHolds struct {
	mu    sync.Mutex
	m     map[string]*quicTransport
	flows map[*layer4.Connection]struct{}
	seq   uint64 // the order of quicJoin: a newer config's handlers have higher ones
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
// reload both configs' listeners take flows for a moment. A claim ends a
// park.
func (t *quicTransport) claim(h *Handler) {
	if t.cur.Load() == h && !t.conn.unclaimed.Load() {
		return
	}
	t.mu.Lock()
	cur := t.cur.Load()
	if cur != h && cur != nil && cur.ctx.Context != h.ctx.Context && cur.quicHeld.seq > h.quicHeld.seq && !cur.closing.Load() {
		t.mu.Unlock()
		return
	}
	t.cur.Store(h)
	parked := t.parked != 0
	t.parked = 0
	if t.claimed != nil {
		close(t.claimed)
		t.claimed = nil
	}
	t.conn.unclaimed.Store(false)
	t.mu.Unlock()
	if parked {
		_, _ = quicTransports.Delete(t.key) // the parked reference: h holds one of its own
	}
}

// park keeps h's reference to t, if h still serves it, until a handler
// claims t or every connection has idled out (idle); until a claim,
// fastudp/ endpoints pass datagrams on to caddy-l4 and new connections
// wait. It reports whether it kept the reference.
func (t *quicTransport) park(h *Handler, idle time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cur.Load() != h {
		return false // claimed by another handler
	}
	t.parked = quicParks.Add(1)
	if t.claimed == nil {
		t.claimed = make(chan struct{})
	}
	t.conn.unclaimed.Store(true)
	t.conn.listenerGone() // caddy-l4 has closed this config's listeners
	go t.watchPark(t.parked, time.Now().Add(idle))
	return true
}

// watchPark releases the parked reference park once idle has passed, or
// as soon as no running config listens on t's listener (a later reload
// removed it, or Caddy stopped), unless a claim ends the park first.
func (t *quicTransport) watchPark(park uint64, idle time.Time) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-t.stop:
			return
		}
		t.mu.Lock()
		parked := t.parked == park
		t.mu.Unlock()
		if !parked {
			return // claimed, or released
		}
		if time.Now().After(idle) || !listenedOn(t.key) {
			t.release(park)
			return
		}
	}
}

// release drops the reference of park, unless a claim has.
func (t *quicTransport) release(park uint64) {
	t.mu.Lock()
	mine := t.parked == park
	if mine {
		t.parked = 0
	}
	t.mu.Unlock()
	if mine {
		_, _ = quicTransports.Delete(t.key)
	}
}

// server waits while t is unclaimed and returns the handler that serves
// it, or nil once t is closing.
func (t *quicTransport) server() *Handler {
	t.mu.Lock()
	claimed := t.claimed
	t.mu.Unlock()
	if claimed != nil {
		select {
		case <-claimed:
		case <-t.stop:
			return nil
		}
	}
	return t.cur.Load()
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
	t := &quicTransport{key: key, conn: conn, done: make(chan struct{}), stop: make(chan struct{})}
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
			h := t.server()
			if h == nil {
				return nil, net.ErrClosed
			}
			return h.QUIC.configForClient(hello)
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

// accept hands each new connection to the handler that serves t, once one
// has claimed it.
func (t *quicTransport) accept() {
	defer close(t.done)
	for {
		c, err := t.ln.Accept(context.Background())
		if err != nil {
			return
		}
		h := t.server()
		if h == nil {
			_ = c.CloseWithError(0, "")
			return
		}
		go h.serveQUIC(t, c)
	}
}

// Destruct closes the transport and its connections.
func (t *quicTransport) Destruct() error {
	close(t.stop) // handshakes and accept waiting for a claim give up
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
	h.warnWildcard(front, cx)
	var dst netip.Addr // the host address the client sent to, if known
	if front != nil {
		dst = front.Socket().Dst(client)
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
		p.n, p.from, p.dst = n, client, dst
		if t.conn.unclaimed.Load() {
			h.reclaim(t)
		}
		if out != nil {
			t.conn.setOut(out, front == nil)
		}
		t.conn.push(p)
	}
}

// reclaim has h claim t, which waits for a claim, when a datagram of a flow
// that h reads reaches it: a handler of the running config, whose flows
// began before t was parked (by a config that failed to start, say). A
// handler cleaned up, or closing, claims nothing.
func (h *Handler) reclaim(t *quicTransport) {
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m[t.key] == t && !h.closing.Load() {
		t.claim(h)
	}
}

// forgetQUICFlow drops a flow whose Handle returns.
func (h *Handler) forgetQUICFlow(cx *layer4.Connection) {
	h.quicHeld.mu.Lock()
	delete(h.quicHeld.flows, cx)
	h.quicHeld.mu.Unlock()
}

// quicJoin prepares h to hold transports.
func (h *Handler) quicJoin() {
	h.quicHeld.m = make(map[string]*quicTransport)
	h.quicHeld.flows = make(map[*layer4.Connection]struct{})
	h.quicHeld.seq = quicSeq.Add(1)
	quicLive.Lock()
	quicLive.hs[h] = struct{}{}
	quicLive.Unlock()
}

// quicLeave lets h's transports go: those h still serves, on a listener
// the running config has, wait for a claim (park); the others keep the
// references of the handlers that claimed them, or are released.
func (h *Handler) quicLeave() {
	quicLive.Lock()
	delete(quicLive.hs, h)
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
	idle := time.Duration(h.QUIC.MaxIdleTimeout)
	if idle <= 0 {
		idle = quicDefaultIdleTimeout
	}
	for key, t := range held {
		kept := false
		if listenedOn(key) {
			if next := onlyQUICHandler(); next != nil {
				next.adoptTransport(key, t)
			}
			kept = t.park(h, idle) // unless next, or a flow, has claimed t
		}
		if !kept {
			t.conn.listenerGone() // caddy-l4 has closed this config's listeners
			_, _ = quicTransports.Delete(key)
		}
	}
	h.QUIC.cleanup()
}

// onlyQUICHandler returns the one QUIC handler of the running config if
// that config has one layer4 server: caddy-l4 routes that server's flows,
// on every listener, to it (no matchers in front of QUIC termination), so
// it serves every listener of the config without waiting for a flow to
// tell. Else nil.
func onlyQUICHandler() *Handler {
	ctx := caddy.ActiveContext()
	if ctx.Context == nil {
		return nil
	}
	app, err := ctx.AppIfConfigured("layer4")
	if err != nil || len(app.(*layer4.App).Servers) != 1 {
		return nil
	}
	quicLive.Lock()
	defer quicLive.Unlock()
	var only *Handler
	for g := range quicLive.hs {
		if g.ctx.Context != ctx.Context {
			continue
		}
		if only != nil {
			return nil
		}
		only = g
	}
	return only
}

// adoptTransport has h, the handler of the listener of t at key, take a
// reference to t, if it holds none yet, and claim it.
func (h *Handler) adoptTransport(key string, t *quicTransport) {
	h.quicHeld.mu.Lock()
	defer h.quicHeld.mu.Unlock()
	if h.quicHeld.m == nil {
		return // cleaned up meanwhile
	}
	if h.quicHeld.m[key] == nil {
		v, _, err := quicTransports.LoadOrNew(key, func() (caddy.Destructor, error) {
			return nil, errors.New("released") // cannot happen: the caller holds a reference
		})
		if err != nil {
			return
		}
		if v.(*quicTransport) != t {
			_, _ = quicTransports.Delete(key)
			return
		}
		h.quicHeld.m[key] = t
	}
	t.claim(h)
}

// listenedOn reports whether the running config has a layer4 server
// listening at key, a transport's network/address: if not, no flow can
// claim the transport.
func listenedOn(key string) bool {
	network, addr, _ := strings.Cut(key, "/")
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return false
	}
	_, found := serverIdleTimeoutOf(caddy.ActiveContext(), network, ap)
	return found
}

// quicDefaultIdleTimeout is quic-go's idle timeout when the config sets none.
const quicDefaultIdleTimeout = 30 * time.Second

// Interface guards
var _ caddy.Destructor = (*quicTransport)(nil)
