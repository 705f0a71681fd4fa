package stabilize

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// perConnectionRouter routes QUIC packets by connection ID, so that a
// connection stays on its server when the client's address changes (NAT
// rebinding, migration). It parses the QUIC invariants only (RFC 8999):
//
//   - an Initial or 0-RTT packet goes where its DCID was routed before
//     (a retransmission, or the Initial after a Retry), or to the server
//     whose QUIC-LB server ID it carries, or else where the policy picks
//     with the DCID as the key; the DCID and the client's connection (its
//     address, port and SCID) are remembered. A DCID of the servers'
//     length that nothing routes goes where its connection went;
//   - any other QUIC packet is routed by its DCID: a QUIC-LB decode, then
//     the connection IDs learned from the servers' long-header replies,
//     then (long headers) the client's connection, then the client's
//     4-tuple as `per flow` does, then the policy;
//   - Version Negotiation, unknown versions and datagrams that are not
//     QUIC are routed as `per flow` routes them.
//
// A connection's server that is down keeps its connection-ID-routed
// datagrams, which no other server could decrypt; they are counted. New
// Initials go to healthy servers.
type perConnectionRouter struct {
	h     *Handler
	lb    *quiclb.Decoder // nil without quic_lb
	bySID map[quiclb.ServerID]*Upstream
	byKey map[addrKey]*Upstream // the upstreams, by the table's address keys

	tables *cidTableSet // of the handler's identity; set by join
	mu     sync.Mutex
	held   map[netip.AddrPort]*cidTable // by listener, until Cleanup
	done   bool                         // Cleanup has released held

	misses   atomic.Uint64 // routed by neither QUIC-LB nor the table
	downSent atomic.Uint64 // routed by connection ID to a down upstream
}

// table returns the connection-ID table of the handler's flows on
// listener, which the handler holds until release.
func (r *perConnectionRouter) table(listener netip.AddrPort) *cidTable {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t := r.held[listener]; t != nil {
		return t
	}
	if r.done { // a flow that Cleanup missed, which ends soon
		return r.tables.acquire(listener, false)
	}
	t := r.tables.acquire(listener, true)
	if r.held == nil {
		r.held = make(map[netip.AddrPort]*cidTable)
	}
	r.held[listener] = t
	return t
}

// release lets go of the tables the handler holds: each stays in its set
// while another handler holds it or it has entries.
func (r *perConnectionRouter) release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range r.held {
		r.tables.release(t)
	}
	r.held, r.done = nil, true
}

// entries is the number of entries in the tables of the handler's
// listeners: those it holds, and those of its identity's set on listeners
// it serves, which a reloaded handler inherits before its first flow there.
func (r *perConnectionRouter) entries() int {
	r.mu.Lock()
	held := make(map[*cidTable]bool, len(r.held))
	for _, t := range r.held {
		held[t] = true
	}
	r.mu.Unlock()
	n := 0
	r.tables.each(func(listener netip.AddrPort, t *cidTable) {
		if held[t] || r.h.serves("udp", listener) || r.h.serves(FastNetwork, listener) {
			n += t.len()
		}
	})
	return n
}

// replyObserver is a router that looks at the upstreams' replies.
type replyObserver interface {
	// observeReply sees b, a reply of u to fl. fl.replyMu is held.
	observeReply(fl *Flow, u *Upstream, b []byte)
}

func (r *perConnectionRouter) route(fl *Flow, b []byte) *Upstream {
	if !quicwire.IsLongHeader(b) {
		if len(b) < 2 {
			return r.byFlow(fl, b)
		}
		return r.byDCID(fl, b, nil, nil)
	}
	hdr, err := quicwire.ParseLong(b)
	if err != nil {
		return r.byFlow(fl, b)
	}
	switch typ, err := hdr.Type(); {
	case err != nil, typ == quicwire.PacketTypeVersionNegotiation:
		return r.byFlow(fl, b)
	case typ == quicwire.PacketTypeInitial, typ == quicwire.PacketType0RTT:
		return r.initial(fl, b, hdr.DCID, hdr.SCID)
	}
	return r.byDCID(fl, b, hdr.DCID, hdr.SCID)
}

// byFlow routes as `per flow` does.
func (r *perConnectionRouter) byFlow(fl *Flow, b []byte) *Upstream {
	return perFlowRouter{r.h}.route(fl, b)
}

// initial routes a client's Initial or 0-RTT packet b and remembers its
// DCID and its connection. An unknown DCID is a new connection's, picked by
// the policy, unless the client's connection is known, by its address,
// port and SCID: then a DCID of a length the servers choose is its
// server's, one the balancer has not seen (quic-go clients switch to one
// from a NEW_CONNECTION_ID frame while they still acknowledge Initials, and
// a reply another balancer relayed teaches nothing). A client may open
// several connections from one socket, each with an SCID of its own, or,
// with zero-length SCIDs, one at a time: its next connection's Initial
// follows the last one's when its random DCID has the servers' length.
func (r *perConnectionRouter) initial(fl *Flow, b, dcid, scid []byte) *Upstream {
	if u := r.learned(fl, dcid); u != nil && u.healthy() {
		return r.stick(fl, u)
	}
	if u := r.decode(fl, dcid, true); u != nil && u.healthy() {
		return r.stick(fl, u)
	}
	if fl.cids.serverLen(len(dcid)) {
		if u := r.connection(fl, dcid, scid); u != nil && u.healthy() {
			return r.stick(fl, u)
		}
		if fl.upstream != nil && fl.cids.full() {
			return r.miss(fl, b, dcid) // as `per flow`, learning nothing
		}
	}
	pool, _ := r.h.candidates()
	if pool == nil {
		return nil
	}
	// The DCID is the key of this one choice; the flow's own key hash,
	// settled at its hand-off, stays.
	hash, hashed := fl.req.hash, fl.req.hashed
	fl.req.Key, fl.req.hashed = dcid, false
	u := r.h.selector.Select(pool, &fl.req)
	fl.req.Key, fl.req.hash, fl.req.hashed = nil, hash, hashed
	if u == nil {
		return nil
	}
	fl.cids.learn(dcid, keyOf(u.addr), fl.idle(), false)
	if k, ok := fl.cids.clientKey(fl.client, scid); ok {
		fl.cids.put(k, keyOf(u.addr), fl.idle())
	}
	return r.stick(fl, u)
}

// connection returns the upstream of the client's connection with SCID
// scid on fl, and learns dcid, which its packet carries, for it; or nil.
func (r *perConnectionRouter) connection(fl *Flow, dcid, scid []byte) *Upstream {
	a, ok := fl.cids.find(fl.cids.clientKey(fl.client, scid))
	if !ok || r.byKey[a] == nil {
		return nil
	}
	fl.cids.learn(dcid, a, fl.idle(), false)
	return r.byKey[a]
}

// byDCID routes a packet by its DCID: dcid and scid of a long header, or
// nil for the short header b, whose DCID length QUIC-LB or the table knows.
func (r *perConnectionRouter) byDCID(fl *Flow, b, dcid, scid []byte) *Upstream {
	var u *Upstream
	if dcid == nil {
		u = r.shortDecode(fl, b)
		if u == nil {
			if k, ok := fl.cids.shortLookup(b); ok {
				u = r.byKey[k]
			}
		}
	} else if u = r.decode(fl, dcid, false); u == nil {
		if u = r.learned(fl, dcid); u == nil {
			u = r.connection(fl, dcid, scid)
		}
	}
	if u == nil {
		return r.miss(fl, b, dcid)
	}
	if !u.healthy() {
		r.downSent.Add(1)
	}
	return r.stick(fl, u)
}

// miss routes a packet whose DCID neither QUIC-LB nor the table knows by
// the client's 4-tuple, and learns its DCID: one the client switched to,
// which a server announced in an encrypted frame. After a NAT rebinding the
// client keeps using it. dcid is the long header's, or nil for the short
// header b, whose DCID is taken of the shortest length the servers use.
func (r *perConnectionRouter) miss(fl *Flow, b, dcid []byte) *Upstream {
	r.misses.Add(1)
	u := r.byFlow(fl, b)
	if u == nil {
		return nil
	}
	if dcid == nil && b[0]&fixedBit != 0 {
		if n := fl.cids.shortestServerLen(); n > 0 && len(b) > n {
			dcid = b[1 : 1+n]
		}
	}
	if dcid != nil {
		fl.cids.learn(dcid, keyOf(u.addr), fl.idle(), false)
	}
	return u
}

// fixedBit is set in the first octet of QUIC v1 and v2 short headers.
const fixedBit = 0x40

// shortDecode decodes the DCID of the short header b with QUIC-LB.
func (r *perConnectionRouter) shortDecode(fl *Flow, b []byte) *Upstream {
	if r.lb == nil {
		return nil
	}
	n := r.lb.CIDLen(b[1])
	if n == 0 || len(b) < 1+n {
		return nil
	}
	return r.decode(fl, b[1:1+n], false)
}

// decode returns the upstream whose server ID cid carries, or nil. exact
// asks for a CID of exactly its configuration's length, as a client's
// random Initial DCID rarely is.
func (r *perConnectionRouter) decode(fl *Flow, cid []byte, exact bool) *Upstream {
	if r.lb == nil || len(cid) == 0 || exact && len(cid) != r.lb.CIDLen(cid[0]) {
		return nil
	}
	sid, err := r.lb.DecodeWith(cid, &fl.lbScratch) // fl.mu is held
	if err != nil {
		return nil
	}
	return r.bySID[sid]
}

// learned returns the upstream the flow's table has for cid, or nil.
func (r *perConnectionRouter) learned(fl *Flow, cid []byte) *Upstream {
	if k, ok := fl.cids.lookup(cid); ok {
		return r.byKey[k]
	}
	return nil
}

// stick makes u the flow's upstream, for the 4-tuple fallback, and
// returns it.
func (r *perConnectionRouter) stick(fl *Flow, u *Upstream) *Upstream {
	if fl.upstream != u {
		fl.assign(u)
	}
	return u
}

// observeReply learns the connection ID a server chose from the SCID of
// its Initial, Handshake or Retry packet.
func (r *perConnectionRouter) observeReply(fl *Flow, u *Upstream, b []byte) {
	if !quicwire.IsLongHeader(b) {
		return
	}
	hdr, err := quicwire.ParseLong(b)
	if err != nil {
		return
	}
	switch typ, err := hdr.Type(); {
	case err != nil:
	case typ == quicwire.PacketTypeInitial, typ == quicwire.PacketTypeHandshake, typ == quicwire.PacketTypeRetry:
		fl.cids.learn(hdr.SCID, keyOf(u.addr), fl.idle(), true)
	}
}

// The `per connection` metrics; see metrics.go.
var (
	connectionIDsDesc = newMetricDesc("connection_ids",
		"Connection IDs a per connection handler has learned on its listeners (client Initial DCIDs and server-chosen SCIDs), and client connections (address, port and SCID); each listener's are shared by the handlers of its identity across reloads.",
		"handler")
	connectionIDMissesDesc = newMetricDesc("connection_id_misses_total",
		"QUIC packets other than Initial and 0-RTT that a per connection handler routed by neither QUIC-LB nor a learned connection ID, but by the client's address. Starts from zero at each config reload.",
		"handler")
	connectionDownDatagramsDesc = newMetricDesc("connection_down_datagrams_total",
		"Datagrams a per connection handler routed by connection ID to a down upstream, as only that upstream can serve the connection. Starts from zero at each config reload.",
		"handler")
)

// collect sends the router's metrics for handler label.
func (r *perConnectionRouter) collect(ch chan<- prometheus.Metric, label string) {
	ch <- prometheus.MustNewConstMetric(connectionIDsDesc, prometheus.GaugeValue, float64(r.entries()), label)
	ch <- prometheus.MustNewConstMetric(connectionIDMissesDesc, prometheus.CounterValue, float64(r.misses.Load()), label)
	ch <- prometheus.MustNewConstMetric(connectionDownDatagramsDesc, prometheus.CounterValue, float64(r.downSent.Load()), label)
}

// Interface guards
var (
	_ router        = (*perConnectionRouter)(nil)
	_ replyObserver = (*perConnectionRouter)(nil)
)
