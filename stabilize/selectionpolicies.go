package stabilize

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/quic-go/quic-go"

	"github.com/stabilize-lb/caddy-stabilize/stabilize/maglev"
)

func init() {
	caddy.RegisterModule(new(RoundRobinSelection))
	caddy.RegisterModule(new(WeightedRoundRobinSelection))
	caddy.RegisterModule(new(RandomSelection))
	caddy.RegisterModule(new(RandomChoiceSelection))
	caddy.RegisterModule(new(LeastSessionsSelection))
	caddy.RegisterModule(new(FirstSelection))
	caddy.RegisterModule(new(MaglevSelection))
}

// LoadBalancing configures how upstreams are picked.
type LoadBalancing struct {
	// The policy that picks an upstream for a datagram or a flow, from the
	// upstreams that are currently healthy. Default: `round_robin`.
	SelectionPolicyRaw json.RawMessage `json:"selection,omitempty" caddy:"namespace=layer4.stabilize.selection_policies inline_key=policy"`
}

// selectionPolicyNamespace is the module namespace of the selection
// policies: `lb_policy <name>` is the module <namespace>.<name>.
const selectionPolicyNamespace = "layer4.stabilize.selection_policies"

// UpstreamPool is an immutable set of upstreams to pick from. A new pool is
// made whenever the set changes, so a policy may cache work per pool.
type UpstreamPool struct {
	Upstreams []*Upstream
}

// Selector picks an upstream from a pool. It is called for every datagram in
// `per packet` mode, so it must be fast, safe for concurrent use and
// allocation-free.
type Selector interface {
	// Select returns one of pool's upstreams for r, or nil to drop the
	// datagram. The pool is never empty.
	Select(pool *UpstreamPool, r *Request) *Upstream
}

// Request is what a policy picks an upstream for: a client flow, or a QUIC
// connection. One goroutine at a time uses it.
type Request struct {
	// Client is the client's address and port, unmapped.
	Client netip.AddrPort

	// Key, when not nil, is what hashing policies hash instead of the
	// client: a QUIC connection ID, say.
	Key []byte

	cx     *layer4.Connection // for placeholders; may be nil
	quic   *quic.Conn         // for placeholders of a terminated connection; may be nil
	hash   uint64             // a hashing policy's key hash, once hashed
	hashed bool
}

// Hash returns the hash that hashing policies key on, computing it with
// compute on first use only: the key of a flow or a connection never
// changes.
func (r *Request) Hash(compute func(*Request) uint64) uint64 {
	if !r.hashed {
		r.hash, r.hashed = compute(r), true
	}
	return r.hash
}

// keyHasher is a Selector that hashes a key of the request.
type keyHasher interface {
	hash(*Request) uint64
}

// settle drops the request's client connection, hashing its key first if
// sel hashes one: a flow's key never changes, and placeholders need the
// connection.
func (r *Request) settle(sel Selector) {
	if kh, ok := sel.(keyHasher); ok && r.Key == nil {
		r.Hash(kh.hash)
	}
	r.cx = nil
}

// Replace replaces the placeholders in s for the request's client
// connection; without one it returns s.
func (r *Request) Replace(s string) string {
	switch {
	case r.cx != nil:
		return r.cx.Replacer().ReplaceAll(s, "")
	case r.quic != nil:
		return quicReplacer(r.quic, r.Client).ReplaceAll(s, "") // quic_relay.go
	}
	return s
}

// RoundRobinSelection takes the upstreams in turn. In `per packet` mode
// datagram i of the handler goes to upstream i mod N, whichever client sent
// it.
type RoundRobinSelection struct {
	next atomic.Uint64
}

// CaddyModule returns the Caddy module information.
func (*RoundRobinSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.round_robin",
		New: func() caddy.Module { return new(RoundRobinSelection) },
	}
}

// Select implements Selector.
func (r *RoundRobinSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	n := r.next.Add(1) - 1
	return pool.Upstreams[n%uint64(len(pool.Upstreams))]
}

// WeightedRoundRobinSelection takes the upstreams in turn in proportion to
// their weights, interleaved smoothly (as nginx does) rather than in bursts.
type WeightedRoundRobinSelection struct {
	next  atomic.Uint64
	order atomic.Pointer[weightedOrder]
}

// weightedOrder is the smooth weighted sequence of one pool.
type weightedOrder struct {
	pool *UpstreamPool
	seq  []*Upstream
}

// CaddyModule returns the Caddy module information.
func (*WeightedRoundRobinSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.weighted_round_robin",
		New: func() caddy.Module { return new(WeightedRoundRobinSelection) },
	}
}

// Select implements Selector.
func (r *WeightedRoundRobinSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	o := r.order.Load()
	if o == nil || o.pool != pool {
		o = &weightedOrder{pool: pool, seq: smoothWeighted(pool.Upstreams)}
		r.order.Store(o)
	}
	n := r.next.Add(1) - 1
	return o.seq[n%uint64(len(o.seq))]
}

// smoothWeighted returns one period of nginx's smooth weighted round robin:
// each upstream appears weight/gcd times, spread out evenly.
func smoothWeighted(ups []*Upstream) []*Upstream {
	g := 0
	for _, u := range ups {
		g = gcd(g, u.Weight)
	}
	total := 0
	for _, u := range ups {
		total += u.Weight / g
	}
	current := make([]int, len(ups))
	seq := make([]*Upstream, 0, total)
	for range total {
		best := 0
		for i, u := range ups {
			current[i] += u.Weight / g
			if current[i] > current[best] {
				best = i
			}
		}
		current[best] -= total
		seq = append(seq, ups[best])
	}
	return seq
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// RandomSelection picks an upstream at random.
type RandomSelection struct{}

// CaddyModule returns the Caddy module information.
func (*RandomSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.random",
		New: func() caddy.Module { return new(RandomSelection) },
	}
}

// Select implements Selector.
func (*RandomSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	return pool.Upstreams[rand.IntN(len(pool.Upstreams))]
}

// RandomChoiceSelection samples Choose upstreams at random and takes the one
// with the fewest live flows ("power of N choices").
type RandomChoiceSelection struct {
	// How many upstreams to sample. Default: 2.
	Choose int `json:"choose,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*RandomChoiceSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.random_choose",
		New: func() caddy.Module { return new(RandomChoiceSelection) },
	}
}

// Provision sets defaults.
func (r *RandomChoiceSelection) Provision(caddy.Context) error {
	if r.Choose == 0 {
		r.Choose = 2
	}
	return nil
}

// Validate checks the configuration.
func (r *RandomChoiceSelection) Validate() error {
	if r.Choose < 2 {
		return fmt.Errorf("random_choose: choose %d: must be at least 2", r.Choose)
	}
	return nil
}

// Select implements Selector.
func (r *RandomChoiceSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	ups := pool.Upstreams
	var best *Upstream
	for range min(r.Choose, len(ups)) {
		u := ups[rand.IntN(len(ups))]
		if best == nil || u.host.Flows() < best.host.Flows() {
			best = u
		}
	}
	return best
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	random_choose [<n>]
func (r *RandomChoiceSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // policy name
	if !d.NextArg() {
		return nil
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil {
		return d.Errf("invalid number of choices %q: must be an integer", d.Val())
	}
	r.Choose = n
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// LeastSessionsSelection picks the upstream with the fewest live flows; ties
// go to the first such upstream after a random start. A flow counts from its
// first datagram until it ends, so in `per packet` mode every upstream counts
// zero and the choice is random.
type LeastSessionsSelection struct{}

// CaddyModule returns the Caddy module information.
func (*LeastSessionsSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.least_sessions",
		New: func() caddy.Module { return new(LeastSessionsSelection) },
	}
}

// Select implements Selector.
func (*LeastSessionsSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	ups := pool.Upstreams
	start := rand.IntN(len(ups))
	best := ups[start]
	for i := 1; i < len(ups); i++ {
		u := ups[(start+i)%len(ups)]
		if u.host.Flows() < best.host.Flows() {
			best = u
		}
	}
	return best
}

// FirstSelection picks the first healthy upstream in the configured order,
// which makes the others fallbacks.
type FirstSelection struct{}

// CaddyModule returns the Caddy module information.
func (*FirstSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.first",
		New: func() caddy.Module { return new(FirstSelection) },
	}
}

// Select implements Selector.
func (*FirstSelection) Select(pool *UpstreamPool, _ *Request) *Upstream {
	return pool.Upstreams[0]
}

// MaglevSelection is a consistent hash: a Maglev lookup table maps a key of
// the flow to an upstream, so two balancers with the same upstreams agree,
// and removing one of N upstreams moves only about 1/N of the keys. The
// table is rebuilt when the set of healthy upstreams changes.
type MaglevSelection struct {
	// What to hash, evaluated once per flow. `{l4.conn.remote_addr}` (the
	// default) is the client's IP address and port; `{l4.conn.remote_ip}`
	// is its IP address alone; any other placeholder or text is expanded
	// with the connection's replacer. For a terminated QUIC connection the
	// placeholders are `{l4.conn.remote_addr}`, `{l4.conn.remote_ip}`,
	// `{l4.conn.local_addr}` and `{l4.tls.server_name}`, the server name
	// the client asked for.
	Key string `json:"key,omitempty"`

	table atomic.Pointer[maglevTable]
}

// maglevTable is the lookup table of one pool.
type maglevTable struct {
	pool  *UpstreamPool
	table *maglev.Table
}

// Maglev keys with a fast path.
const (
	keyRemoteAddr = "{l4.conn.remote_addr}"
	keyRemoteIP   = "{l4.conn.remote_ip}"
)

// CaddyModule returns the Caddy module information.
func (*MaglevSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.stabilize.selection_policies.maglev",
		New: func() caddy.Module { return new(MaglevSelection) },
	}
}

// Select implements Selector.
func (m *MaglevSelection) Select(pool *UpstreamPool, r *Request) *Upstream {
	hash := r.Hash(m.hash)
	t := m.table.Load()
	if t == nil || t.pool != pool {
		t = &maglevTable{pool: pool, table: newMaglevTable(pool.Upstreams)}
		m.table.Store(t)
	}
	return pool.Upstreams[t.table.Lookup(hash)]
}

// hash is the request's key hash: its Key when set, else the key placeholder
// (by default the client's address and port).
func (m *MaglevSelection) hash(r *Request) uint64 {
	switch {
	case r.Key != nil:
		return maglev.HashBytes(r.Key)
	case m.Key == "" || m.Key == keyRemoteAddr:
		return maglev.HashAddrPort(r.Client)
	case m.Key == keyRemoteIP:
		return maglev.HashAddr(r.Client.Addr())
	}
	return maglev.HashString(r.Replace(m.Key))
}

// newMaglevTable builds a weighted table named by the upstreams' addresses,
// so balancers that list the same upstreams in any order agree.
func newMaglevTable(ups []*Upstream) *maglev.Table {
	names := make([]string, len(ups))
	weights := make([]int, len(ups))
	for i, u := range ups {
		names[i], weights[i] = u.addr.String(), u.Weight
	}
	t, err := maglev.NewWeighted(names, weights)
	if err != nil {
		panic(err) // weights are validated at provisioning
	}
	return t
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	maglev [<key>]
func (m *MaglevSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // policy name
	if d.NextArg() {
		m.Key = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// Interface guards
var (
	_ Selector = (*RoundRobinSelection)(nil)
	_ Selector = (*WeightedRoundRobinSelection)(nil)
	_ Selector = (*RandomSelection)(nil)
	_ Selector = (*RandomChoiceSelection)(nil)
	_ Selector = (*LeastSessionsSelection)(nil)
	_ Selector = (*FirstSelection)(nil)
	_ Selector = (*MaglevSelection)(nil)

	_ keyHasher = (*MaglevSelection)(nil)

	_ caddy.Provisioner     = (*RandomChoiceSelection)(nil)
	_ caddy.Validator       = (*RandomChoiceSelection)(nil)
	_ caddyfile.Unmarshaler = (*RandomChoiceSelection)(nil)
	_ caddyfile.Unmarshaler = (*MaglevSelection)(nil)
)
