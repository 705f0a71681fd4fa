// Package stabilize is a UDP load balancer for Caddy: the caddy-l4 handler
// `layer4.handlers.stabilize`. caddy-l4 hands it one client flow (a client
// address and port) at a time; it spreads the flow's datagrams over its
// upstreams, per packet or per flow, and relays the replies back.
package stabilize

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// ListenerBufferSize is the size of the buffers caddy-l4's UDP listener reads
// into. A longer datagram reaches the handler cut to this size, so the
// handler drops datagrams of this size and counts them as truncated.
const ListenerBufferSize = 9000

// Granularities: when the policy picks an upstream.
const (
	PerFlow   = "flow"   // on a flow's first datagram; the flow then stays
	PerPacket = "packet" // for every datagram
)

// Handler balances UDP flows over upstream servers.
type Handler struct {
	// The upstream UDP servers.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// When the load balancing policy picks an upstream: `flow` (default)
	// picks on a client flow's first datagram and keeps the flow there until
	// it ends at caddy-l4's idle timeout; `packet` picks for every datagram.
	Per string `json:"per,omitempty"`

	// How upstreams are picked. Default: round robin.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// How upstreams are judged healthy. Default: all are healthy.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// Prepend a PROXY protocol header to every datagram sent upstream,
	// carrying the client's address and port: `v2` is the only UDP-capable
	// version. Default: off.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// The receive buffer size of each upstream-facing socket, in bytes.
	// Default: the system's.
	ReadBuffer int `json:"read_buffer,omitempty"`

	// The send buffer size of each upstream-facing socket, in bytes.
	// Default: the system's.
	WriteBuffer int `json:"write_buffer,omitempty"`

	// The most client flows this handler keeps at once; a new flow over the
	// cap is dropped and counted as `flow_limit`, established flows are
	// unaffected. Default: derived from the process's open-file limit (see
	// README). -1 means no limit.
	MaxFlows int `json:"max_flows,omitempty"`

	// The most flows from one client IP address. Default: 0, no limit.
	MaxFlowsPerIP int `json:"max_flows_per_ip,omitempty"`

	ctx      caddy.Context
	logger   *zap.Logger
	selector Selector
	byAddr   map[netip.AddrPort]*Upstream // for replies
	network  string                       // of the upstream-facing sockets
	perFlow  bool
	all      *UpstreamPool // every upstream, healthy or not

	poolMu sync.Mutex
	pool   atomic.Pointer[healthyPool]

	drops        [numDropReasons]atomic.Uint64
	allDownSent  atomic.Uint64 // datagrams sent while every upstream was down
	warnTruncate sync.Once

	affinity    *affinity // per flow only
	affinityKey string
	closing     atomic.Bool // Cleanup has begun

	mu    sync.Mutex
	flows map[*Flow]struct{}
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.stabilize",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.ctx = ctx
	h.logger = ctx.Logger()
	h.flows = make(map[*Flow]struct{})

	switch h.Per {
	case "", PerFlow:
		h.perFlow = true
	case PerPacket:
	default:
		return fmt.Errorf("per %q: must be %q or %q", h.Per, PerFlow, PerPacket)
	}

	if h.LoadBalancing == nil {
		h.LoadBalancing = new(LoadBalancing)
	}
	if h.LoadBalancing.SelectionPolicyRaw != nil {
		mod, err := ctx.LoadModule(h.LoadBalancing, "SelectionPolicyRaw")
		if err != nil {
			return fmt.Errorf("load_balancing.selection: %w", err)
		}
		h.selector = mod.(Selector)
	} else {
		h.selector = new(RoundRobinSelection)
	}

	if len(h.Upstreams) == 0 {
		return errors.New("upstreams: at least one upstream is required")
	}
	h.byAddr = make(map[netip.AddrPort]*Upstream, len(h.Upstreams))
	v4, v6 := 0, 0
	for i, u := range h.Upstreams {
		if err := u.provision(); err != nil {
			return fmt.Errorf("upstreams[%d]: %w", i, err)
		}
		if _, dup := h.byAddr[u.addr]; dup {
			return fmt.Errorf("upstreams[%d]: upstream %q is listed twice", i, u.Dial)
		}
		h.byAddr[u.addr] = u
		if u.addr.Addr().Is4() {
			v4++
		} else {
			v6++
		}
	}
	switch {
	case v6 == 0:
		h.network = "udp4"
	case v4 == 0:
		h.network = "udp6"
	default:
		h.network = "udp"
	}
	if h.ReadBuffer < 0 {
		return fmt.Errorf("read_buffer %d: must not be negative", h.ReadBuffer)
	}
	if h.WriteBuffer < 0 {
		return fmt.Errorf("write_buffer %d: must not be negative", h.WriteBuffer)
	}
	if h.ReadBuffer > math.MaxInt32 {
		return fmt.Errorf("read_buffer %d: must be at most %d", h.ReadBuffer, math.MaxInt32)
	}
	if h.WriteBuffer > math.MaxInt32 {
		return fmt.Errorf("write_buffer %d: must be at most %d", h.WriteBuffer, math.MaxInt32)
	}
	if h.MaxFlows < -1 {
		return fmt.Errorf("max_flows %d: must be -1 (no limit), 0 (the default) or positive", h.MaxFlows)
	}
	if h.MaxFlowsPerIP < 0 {
		return fmt.Errorf("max_flows_per_ip %d: must not be negative", h.MaxFlowsPerIP)
	}
	switch h.ProxyProtocol {
	case "", "v2":
	default:
		return fmt.Errorf("proxy_protocol %q: must be \"v2\" (v1 is TCP-only)", h.ProxyProtocol)
	}
	if h.perFlow {
		h.affinityKey = "per=flow;selection=" + string(h.LoadBalancing.SelectionPolicyRaw)
		a, _ := affinities.LoadOrStore(h.affinityKey, &affinity{m: make(map[affinityKey]affinityEntry)})
		h.affinity = a.(*affinity)
	}
	h.all = &UpstreamPool{Upstreams: h.Upstreams}
	h.pool.Store(&healthyPool{epoch: ^uint64(0)})
	h.registerMetrics(ctx) // metrics.go
	if err := h.provisionHealthChecks(); err != nil {
		return err
	}
	if handlerProvisioned != nil {
		handlerProvisioned(h)
	}
	return nil
}

// handlerProvisioned, when set (by tests), is called with every handler
// provisioned successfully.
var handlerProvisioned func(*Handler)

// Cleanup ends this instance's flows (their sockets and goroutines) and
// releases its hosts. After a reload the client's next datagram reaches the
// new instance.
func (h *Handler) Cleanup() error {
	h.closing.Store(true)
	h.stopHealthChecks()
	h.mu.Lock()
	flows := make([]*Flow, 0, len(h.flows))
	for fl := range h.flows {
		flows = append(flows, fl)
	}
	h.mu.Unlock()
	for _, fl := range flows {
		if fl.detached.Load() {
			fl.close()
			continue
		}
		fl.closeSocket()
		// Wake Handle from cx.Read to end the flow. A read deadline only
		// touches caddy-l4's packetConn, never the shared socket.
		_ = fl.cx.SetReadDeadline(time.Unix(1, 0))
	}
	for _, u := range h.Upstreams {
		u.release()
	}
	if h.affinity != nil {
		_, _ = affinities.Delete(h.affinityKey)
	}
	return nil
}

// Handle balances one client flow. It reads the flow until caddy-l4 ends it
// with io.EOF at its idle timeout, and never blocks that loop on an
// upstream, so one slow or dead upstream cannot stall the listener. On a
// fastudp listener it returns sooner: once the flow's datagrams bypass
// caddy-l4, the socket keeps the flow.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	client := addrPort(cx.RemoteAddr())
	if !client.IsValid() {
		return fmt.Errorf("stabilize handles UDP only, not %s", cx.RemoteAddr().Network())
	}
	fl, err := h.newFlow(cx, client)
	if err != nil {
		// Keep draining so the listener never blocks on this flow.
		h.logger.Error("opening upstream socket", zap.Stringer("client", client), zap.Error(err))
		_, _ = io.Copy(io.Discard, cx)
		return nil
	}
	for {
		if fl.fast != nil {
			// Once the flow is registered, its datagrams bypass caddy-l4, so
			// nothing more can queue up for this Handle: stop waiting soon.
			_ = cx.SetReadDeadline(time.Now().Add(fastHandoff))
		}
		// Wait for a datagram without holding a buffer: a zero-length read
		// returns once one has arrived and leaves it for the next read.
		start := time.Now()
		_, err := cx.Read(nil)
		waited := time.Since(start)
		if err == io.EOF && waited < emptyDatagramWindow {
			// caddy-l4 reports an empty datagram as an immediate io.EOF;
			// the end of the flow comes only after its idle timeout.
			fl.forward(fl.header)
			continue
		}
		if err != nil {
			if fl.fast != nil && !h.closing.Load() {
				idle := waited // caddy-l4's idle timeout ended the read
				if errors.Is(err, os.ErrDeadlineExceeded) {
					idle = h.listenerIdleTimeout(fl.fast)
				}
				if fl.detach(idle) {
					return nil // the flow goes on, bypassing caddy-l4
				}
			}
			fl.close()
			if errors.Is(err, io.EOF) || h.closing.Load() {
				return nil
			}
			return fmt.Errorf("reading client flow: %w", err)
		}
		h.forwardNext(fl, cx)
	}
}

// forwardNext reads the datagram waiting in cx into a pooled buffer, after
// the flow's PROXY header, and forwards it.
func (h *Handler) forwardNext(fl *Flow, cx *layer4.Connection) {
	buf := datagramPool.Get().(*[maxProxyHeader + ListenerBufferSize]byte)
	defer datagramPool.Put(buf)
	hdr := copy(buf[:], fl.header)
	n, err := cx.Read(buf[hdr : hdr+ListenerBufferSize])
	if err != nil {
		return // the next read reports it
	}
	if n == ListenerBufferSize && fl.fast == nil { // a fast socket checks exactly
		h.drop(dropTruncated)
		h.warnTruncate.Do(func() {
			h.logger.Warn("dropping datagrams of the listener's buffer size: longer ones arrive truncated",
				zap.Stringer("client", fl.client), zap.Int("size", n))
		})
		return
	}
	fl.forward(buf[:hdr+n])
}

// datagramPool holds buffers for one client datagram and its PROXY header.
var datagramPool = sync.Pool{New: func() any { return new([maxProxyHeader + ListenerBufferSize]byte) }}

// fastHandoff is how long Handle waits for datagrams of a flow on a fast
// socket before it leaves the flow to the socket.
const fastHandoff = 2 * time.Second

// listenerIdleTimeout is the idle timeout of the layer4 server listening on
// s, which ends the flows of s that bypass caddy-l4.
func (h *Handler) listenerIdleTimeout(s *fastSocket) time.Duration {
	port := s.conn.LocalAddr().(*net.UDPAddr).Port
	if app, err := h.ctx.AppIfConfigured("layer4"); err == nil {
		for _, srv := range app.(*layer4.App).Servers {
			for _, l := range srv.Listen {
				na, err := caddy.ParseNetworkAddress(l)
				if err == nil && na.Network == FastNetwork && uint(port) >= na.StartPort && uint(port) <= na.EndPort {
					return time.Duration(srv.IdleTimeout)
				}
			}
		}
	}
	return 30 * time.Second // caddy-l4's default
}

// emptyDatagramWindow tells an empty datagram (io.EOF at once) from the end
// of the flow (io.EOF after the idle timeout, which is far longer).
const emptyDatagramWindow = 100 * time.Millisecond

// healthyPool is the pool of healthy upstreams as of a health epoch.
type healthyPool struct {
	epoch uint64
	pool  *UpstreamPool
}

// available is the pool of healthy upstreams, rebuilt after any health
// transition. It may be empty.
func (h *Handler) available() *UpstreamPool {
	epoch := healthEpoch.Load()
	if p := h.pool.Load(); p.epoch == epoch {
		return p.pool
	}
	h.poolMu.Lock()
	defer h.poolMu.Unlock()
	if p := h.pool.Load(); p.epoch == epoch {
		return p.pool
	}
	healthy := make([]*Upstream, 0, len(h.Upstreams))
	for _, u := range h.Upstreams {
		if u.host.Healthy() {
			healthy = append(healthy, u)
		}
	}
	pool := h.all
	if len(healthy) < len(h.Upstreams) {
		pool = &UpstreamPool{Upstreams: healthy}
	}
	h.pool.Store(&healthyPool{epoch: epoch, pool: pool})
	return pool
}

// pick selects an upstream for fl, or nil when there is none. When every
// upstream is down it fails open, picking from all of them, unless
// drop_when_all_down is set.
func (h *Handler) pick(fl *Flow) *Upstream {
	pool := h.available()
	if len(pool.Upstreams) == 0 {
		if h.HealthChecks != nil && h.HealthChecks.DropWhenAllDown {
			return nil
		}
		h.allDownSent.Add(1)
		pool = h.all
	}
	return h.selector.Select(pool, fl)
}

// dropReason says why a datagram was not forwarded.
type dropReason int

const (
	dropNoUpstream    dropReason = iota // no healthy upstream
	dropUnknownSource                   // a reply from an address that is not an upstream
	dropTruncated                       // cut short by the listener's buffer
	dropWriteError                      // sending failed
	dropReplyTooLarge                   // a reply longer than the reply buffer
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	dropNoUpstream:    "no_upstream",
	dropUnknownSource: "unknown_source",
	dropTruncated:     "truncated",
	dropWriteError:    "write_error",
	dropReplyTooLarge: "reply_too_large",
}

func (r dropReason) String() string { return dropReasonNames[r] }

func (h *Handler) drop(r dropReason) {
	h.drops[r].Add(1)
}

// Drops returns how many datagrams were dropped for each reason.
func (h *Handler) Drops() map[string]uint64 {
	m := make(map[string]uint64, numDropReasons)
	for r := range numDropReasons {
		m[r.String()] = h.drops[r].Load()
	}
	return m
}

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
