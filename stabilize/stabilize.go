package stabilize

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
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

	// PerConnection routes QUIC packets by connection ID; see
	// perConnectionRouter.
	PerConnection = "connection"
)

// Handler balances UDP flows over upstream servers.
type Handler struct {
	// The upstream UDP servers.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// The handler's name: the `handler` label of its metrics and a field
	// of its logs. Unique among the config's stabilize handlers, and not a
	// number. Default: the handler's ordinal among the config's stabilize
	// handlers in provisioning order ("0", "1", …), which stays the same
	// across reloads only in a config with one layer4 server (caddy-l4
	// provisions its servers in random order).
	Name string `json:"name,omitempty"`

	// When the load balancing policy picks an upstream: `flow` (default)
	// picks on a client flow's first datagram and keeps the flow there until
	// it ends at caddy-l4's idle timeout; `packet` picks for every datagram;
	// `connection` picks for each QUIC connection and routes its packets by
	// connection ID, through client address changes.
	Per string `json:"per,omitempty"`

	// QUIC-LB configurations (`per connection` only): the servers encode
	// their `server_id` in the connection IDs they issue, so that any
	// balancer with the same configuration routes every packet of a
	// connection to its server. Several, with distinct config IDs, during a
	// key rotation.
	QUICLB []*QUICLBConfig `json:"quic_lb,omitempty"`

	// How upstreams are picked. Default: round robin.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// How upstreams are judged healthy. Default: all are healthy.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// Prepend a PROXY protocol header to every datagram sent upstream,
	// carrying the client's address and port: `v2` is the only UDP-capable
	// version. Default: off.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// The receive buffer size of each upstream-facing socket, in bytes,
	// including those of `udp/` upstreams behind QUIC termination.
	// Default: the system's. Not with `quic/` upstreams.
	ReadBuffer int `json:"read_buffer,omitempty"`

	// The send buffer size of each upstream-facing socket, in bytes.
	// Default: the system's. Not with `quic/` upstreams.
	WriteBuffer int `json:"write_buffer,omitempty"`

	// The most client flows this handler keeps at once; a new flow over the
	// cap is dropped and counted as `flow_limit`, established flows are
	// unaffected. Default: derived from the process's open-file limit (see
	// README). -1 means no limit.
	MaxFlows int `json:"max_flows,omitempty"`

	// The most flows from one client IP address. Default: 0, no limit.
	MaxFlowsPerIP int `json:"max_flows_per_ip,omitempty"`

	// The source IP addresses of the upstream-facing sockets, as nginx's
	// proxy_bind and HAProxy's source: flows are spread over them in turn,
	// each upstream's over those of its address family. Each source address
	// has its own ephemeral ports, so in `per packet` mode, where every flow
	// holds a port of its own, they multiply how many flows fit. Default:
	// the address the routing picks for each upstream. Behind QUIC
	// termination each client connection takes one, in turn, for its
	// requests to `udp/` upstreams. Not with `quic/` upstreams, whose
	// connections all leave from one socket.
	LocalAddresses []string `json:"local_addresses,omitempty"`

	// Terminates the clients' QUIC connections and relays their streams
	// and datagrams to `quic/` upstreams, or request by request to `udp/`
	// upstreams. Default: off, datagrams are balanced as they are.
	QUIC *QUIC `json:"quic,omitempty"`

	ctx      caddy.Context
	logger   *zap.Logger
	selector Selector
	router   router
	observer replyObserver                // the router, if it looks at replies
	byAddr   map[netip.AddrPort]*Upstream // for replies
	network  string                       // of the upstream-facing sockets
	all      *UpstreamPool                // every upstream, healthy or not
	maxFlows int                          // MaxFlows resolved; 0: no limit

	locals, locals4, locals6 []netip.Addr // LocalAddresses: all, IPv4, IPv6
	nextLocal                atomic.Uint32

	poolMu sync.Mutex
	pool   atomic.Pointer[healthyPool]

	drops          [numDropReasons]atomic.Uint64
	allDownSent    atomic.Uint64 // datagrams sent while every upstream was down
	warned         [numDropReasons]atomic.Bool
	warnedListener atomic.Bool // replies through cx.Write
	warnedWild     atomic.Bool // replies from the route's address; see warnWildcard
	warnedSrc      atomic.Bool // a reply source no longer local; see replyReactor.unsource

	identity string    // handlers with one identity hand flows on; see reload.go
	affinity *affinity // per flow and per connection
	// The listen addresses of the layer4 server whose routes hold h, if
	// known; see serves.
	listens      []string
	listensKnown bool
	closing      atomic.Bool

	mu     sync.Mutex
	flows  map[*Flow]struct{}
	nflows int                // flows counted against the limits; see limits.go
	perIP  map[netip.Addr]int // flows by client address, with MaxFlowsPerIP
	// refused flows being read; Cleanup ends them, see refuse
	refusing map[*layer4.Connection]struct{}
	// what the flows on each listener share; see flow.go
	listeners map[listenerKey]*listenerInfo

	quicHeld quicHolds // terminating transports; see quic_transport.go
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.stabilize",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler. Every check of the config is made here.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.ctx = ctx
	h.logger = ctx.Logger()
	if h.Name != "" {
		if _, err := strconv.ParseUint(h.Name, 10, 64); err == nil {
			return fmt.Errorf("name %q: must not be a number, which unnamed handlers' metrics use", h.Name)
		}
		h.logger = h.logger.With(zap.String("handler", h.Name))
	}
	h.flows = make(map[*Flow]struct{})
	h.perIP = make(map[netip.Addr]int)

	if h.LoadBalancing == nil {
		h.LoadBalancing = new(LoadBalancing)
	}
	// Loading the policy clears its raw JSON, which names it in the
	// handler's identity.
	h.identity = "selection=" + string(h.LoadBalancing.SelectionPolicyRaw)
	if h.LoadBalancing.SelectionPolicyRaw != nil {
		mod, err := ctx.LoadModule(h.LoadBalancing, "SelectionPolicyRaw")
		if err != nil {
			return fmt.Errorf("load_balancing.selection: %w", err)
		}
		h.selector = mod.(Selector)
	} else {
		h.selector = new(RoundRobinSelection)
	}
	switch h.Per {
	case "", PerFlow:
		h.router = perFlowRouter{h}
	case PerPacket:
		h.router = perPacketRouter{h}
	case PerConnection:
		h.router = &perConnectionRouter{h: h}
	default:
		return fmt.Errorf("per %q: must be %q, %q or %q", h.Per, PerFlow, PerPacket, PerConnection)
	}
	h.observer, _ = h.router.(replyObserver)

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
	perConn, _ := h.router.(*perConnectionRouter)
	if err := h.provisionQUICLB(perConn); err != nil {
		return err
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
	if err := h.provisionLocalAddresses(v4 > 0, v6 > 0); err != nil {
		return err
	}
	if err := h.provisionLimits(); err != nil {
		return err
	}
	switch h.ProxyProtocol {
	case "", "v2":
	default:
		return fmt.Errorf("proxy_protocol %q: must be \"v2\" (v1 is TCP-only)", h.ProxyProtocol)
	}
	if err := h.provisionQUIC(ctx); err != nil {
		return err
	}
	h.all = &UpstreamPool{Upstreams: h.Upstreams}
	h.pool.Store(&healthyPool{epoch: ^uint64(0)})
	if err := h.registerMetrics(ctx); err != nil { // metrics.go
		return err
	}
	if err := h.provisionHealthChecks(); err != nil {
		return err
	}
	h.join() // reload.go
	if h.QUIC != nil {
		h.quicJoin() // quic_transport.go
	}
	if handlerProvisioned != nil {
		handlerProvisioned(h)
	}
	return nil
}

// handlerProvisioned, when set (by tests), is called with every handler
// provisioned successfully.
var handlerProvisioned func(*Handler)

// Cleanup ends this instance's flows and releases its hosts. A flow on a
// fastudp socket moves to the next config's handler of the same identity
// that serves its listener, if that handler still has the flow's upstream,
// keeping its socket, so no reply in flight is lost; other flows end, and
// the client's next datagram takes the listener's new route, where a
// handler of the same identity finds the flow's upstream in the affinity
// table.
func (h *Handler) Cleanup() error {
	h.closing.Store(true)
	h.stopHealthChecks()
	next := h.leave() // reload.go
	if h.QUIC != nil {
		h.quicLeave() // quic_transport.go
	}
	h.mu.Lock()
	flows := make([]*Flow, 0, len(h.flows))
	for fl := range h.flows {
		flows = append(flows, fl)
	}
	for cx := range h.refusing {
		_ = cx.SetReadDeadline(time.Unix(1, 0))
	}
	h.mu.Unlock()
	to := make(map[netip.AddrPort]*Handler) // the successors, by listener
	for _, fl := range flows {
		succ, found := to[fl.listener]
		if !found && len(next) > 0 && fl.fast != nil {
			succ = h.successor(next, fl.listener) // reload.go
			to[fl.listener] = succ
		}
		if succ != nil && fl.moveTo(succ) {
			h.forget(fl)
		} else {
			// Closed, not just its socket: a datagram that arrives
			// before its Handle wakes finds a closed flow, no write_error.
			fl.closeFor(h)
		}
		fl.wakeHandle()
	}
	for _, u := range h.Upstreams {
		u.release()
	}
	if h.affinity != nil {
		_, _ = affinities.Delete(h.identity)
	}
	if r, ok := h.router.(*perConnectionRouter); ok && r.tables != nil {
		r.release()
		_, _ = cidTables.Delete(h.identity)
	}
	return nil
}

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
		if u.healthy() {
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

// candidates is the pool a policy picks from: the healthy upstreams, or
// when every upstream is down, all of them (failing open, counted as
// all_down) or none (with drop_when_all_down). allDown says every upstream
// is down.
func (h *Handler) candidates() (pool *UpstreamPool, allDown bool) {
	pool = h.available()
	if len(pool.Upstreams) > 0 {
		return pool, false
	}
	if h.HealthChecks != nil && h.HealthChecks.DropWhenAllDown {
		return nil, true
	}
	h.allDownSent.Add(1)
	return h.all, true
}

// dropReason says why a datagram or a flow was not forwarded.
type dropReason int

const (
	dropNoUpstream        dropReason = iota // no healthy upstream
	dropUnknownSource                       // a reply from an address that is not an upstream
	dropTruncated                           // cut short by the listener's buffer
	dropWriteError                          // sending failed
	dropReplyTooLarge                       // a reply longer than the reply buffer
	dropSendBufferFull                      // a socket's send buffer was full
	dropFlowLimit                           // a new flow over max_flows or max_flows_per_ip
	dropSocketUnavailable                   // a new flow's socket could not be opened
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	dropNoUpstream:        "no_upstream",
	dropUnknownSource:     "unknown_source",
	dropTruncated:         "truncated",
	dropWriteError:        "write_error",
	dropReplyTooLarge:     "reply_too_large",
	dropSendBufferFull:    "send_buffer_full",
	dropFlowLimit:         "flow_limit",
	dropSocketUnavailable: "socket_unavailable",
}

func (r dropReason) String() string { return dropReasonNames[r] }

func (h *Handler) drop(r dropReason) {
	h.drops[r].Add(1)
}

// warnOnce logs msg at Warn the first time this handler drops for r.
func (h *Handler) warnOnce(r dropReason, msg string, fields ...zap.Field) {
	if !h.warned[r].Swap(true) {
		h.logger.Warn(msg, append(fields, zap.Stringer("reason", r))...)
	}
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
