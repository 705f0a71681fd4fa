package stabilize

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// newConnectionRouter provisions a `per connection` handler with quic_lb
// and upstreams 127.0.0.1:7001-7003 (server IDs 0001-0003), outside
// Caddy, and returns its router and a flow of it.
func newConnectionRouter(tb testing.TB, quicLB bool) (*perConnectionRouter, *Flow) {
	tb.Helper()
	h := &Handler{Per: PerConnection}
	for i := range 3 {
		u := &Upstream{Dial: fmt.Sprintf("udp/127.0.0.1:%d", 7001+i)}
		if quicLB {
			u.ServerID = hex.EncodeToString([]byte{0, byte(i + 1)})
		}
		h.Upstreams = append(h.Upstreams, u)
	}
	if quicLB {
		h.QUICLB = []*QUICLBConfig{{ConfigID: int(testQUICLB.ID), ServerIDLength: testQUICLB.ServerIDLen,
			NonceLength: testQUICLB.NonceLen, Key: hex.EncodeToString(testQUICLB.Key)}}
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: tb.Context()})
	tb.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = h.Cleanup() })
	fl := testFlow(h, netip.MustParseAddrPort("127.0.0.1:40000"))
	fl.req = Request{Client: fl.client}
	return h.router.(*perConnectionRouter), fl
}

// quicLBCID returns a connection ID of testQUICLB for server ID sid.
func quicLBCID(tb testing.TB, sid byte) []byte {
	tb.Helper()
	g, err := quiclb.NewGenerator(testQUICLB, []byte{0, sid})
	if err != nil {
		tb.Fatal(err)
	}
	cid, err := g.GenerateConnectionID()
	if err != nil {
		tb.Fatal(err)
	}
	return cid.Bytes()
}

// longHeader returns a QUIC v1 long header packet of type typ (0 Initial,
// 1 0-RTT, 2 Handshake, 3 Retry) with a payload.
func longHeader(typ byte, dcid, scid []byte) []byte {
	b := []byte{0xc0 | typ<<4, 0, 0, 0, 1, byte(len(dcid))}
	b = append(b, dcid...)
	b = append(b, byte(len(scid)))
	b = append(b, scid...)
	return append(b, make([]byte, 32)...)
}

// shortHeader returns a 1-RTT packet for dcid.
func shortHeader(dcid []byte) []byte {
	return append(append([]byte{0x40}, dcid...), make([]byte, 32)...)
}

// TestConnectionRouteOrder checks the routing order of the issue: Initials
// by policy with their DCID remembered; a server's SCID learned from its
// reply; short headers by QUIC-LB, then the table, then the 4-tuple.
func TestConnectionRouteOrder(t *testing.T) {
	r, fl := newConnectionRouter(t, true)
	ups := r.h.Upstreams

	// A client Initial: the policy (round robin) picks; its retransmission
	// goes to the same upstream although round robin moves on.
	odcid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	first := r.route(fl, longHeader(0, odcid, []byte{9}))
	if again := r.route(fl, longHeader(0, odcid, []byte{9})); again != first {
		t.Fatalf("a retransmitted Initial went to %s, then %s", first.Dial, again.Dial)
	}

	// A QUIC-LB connection ID routes to its server from any flow.
	other := testFlow(r.h, netip.MustParseAddrPort("127.0.0.1:40001"))
	for i, u := range ups {
		if got := r.route(other, shortHeader(quicLBCID(t, byte(i+1)))); got != u {
			t.Errorf("QUIC-LB server ID %d routed to %s, want %s", i+1, got.Dial, u.Dial)
		}
	}

	// A server's SCID, learned from its Handshake reply, routes short
	// headers of a new flow (a rebinding) to it.
	scid := []byte{0xaa, 0xbb, 0xcc, 0xdd}
	r.observeReply(fl, ups[2], longHeader(2, []byte{9}, scid))
	rebound := testFlow(r.h, netip.MustParseAddrPort("127.0.0.1:40002"))
	if got := r.route(rebound, shortHeader(scid)); got != ups[2] {
		t.Errorf("learned SCID routed to %v, want %s", got, ups[2].Dial)
	}
	// The Initial after a Retry carries the server's chosen CID.
	retry := []byte{0x11, 0x22, 0x33, 0x44}
	r.observeReply(fl, ups[1], longHeader(3, []byte{9}, retry))
	if got := r.route(rebound, longHeader(0, retry, []byte{9})); got != ups[1] {
		t.Errorf("Initial after Retry routed to %v, want %s", got, ups[1].Dial)
	}

	// An unknown short header on a routed flow stays on the flow's
	// upstream, and is counted as a miss.
	misses := r.misses.Load()
	if got := r.route(rebound, shortHeader([]byte{0xde, 0xad, 0xbe, 0xef})); got != ups[1] {
		t.Errorf("unknown DCID routed to %v, want the flow's %s", got, ups[1].Dial)
	}
	if r.misses.Load() != misses+1 {
		t.Errorf("misses %d, want %d", r.misses.Load(), misses+1)
	}

	// Not QUIC, and Version Negotiation, go by the flow.
	for _, b := range [][]byte{{}, []byte("x"), {0x80, 0, 0, 0, 0, 0, 0}, {0xc0, 0xff, 0, 0, 9, 0, 0}} {
		if got := r.route(rebound, b); got != ups[1] {
			t.Errorf("datagram %x routed to %v, want the flow's %s", b, got, ups[1].Dial)
		}
	}
}

// TestConnectionRouteDownUpstream checks health: a connection on a down
// upstream stays there (only it has the keys) and is counted; new Initials
// go to healthy upstreams.
func TestConnectionRouteDownUpstream(t *testing.T) {
	r, fl := newConnectionRouter(t, true)
	ups := r.h.Upstreams
	down := ups[0]
	down.passiveChecks = true
	down.host.health.down.Store(true)
	healthEpoch.Add(1)
	t.Cleanup(func() {
		down.host.health.down.Store(false)
		healthEpoch.Add(1)
	})
	if down.healthy() {
		t.Fatal("upstream still healthy")
	}
	if got := r.route(fl, shortHeader(quicLBCID(t, 1))); got != down {
		t.Errorf("a connection of the down upstream moved to %v", got)
	}
	if r.downSent.Load() != 1 {
		t.Errorf("down datagrams %d, want 1", r.downSent.Load())
	}
	for i := range 6 {
		f := testFlow(r.h, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), uint16(1000+i)))
		if got := r.route(f, longHeader(0, []byte{byte(i), 1, 2, 3, 4, 5, 6, 7}, nil)); got == down {
			t.Errorf("Initial %d went to the down upstream", i)
		}
	}
}

// shortHeaderRoute returns a router, a flow and a short-header packet for
// upstream 1, which the router knows by QUIC-LB, or else has learned from
// the upstream's Handshake reply.
func shortHeaderRoute(tb testing.TB, quicLB bool) (*perConnectionRouter, *Flow, []byte) {
	tb.Helper()
	r, fl := newConnectionRouter(tb, quicLB)
	pkt := shortHeader(quicLBCID(tb, 2))
	if !quicLB {
		r.observeReply(fl, r.h.Upstreams[1], longHeader(2, nil, pkt[1:1+testQUICLB.CIDLen()]))
	}
	return r, fl, pkt
}

// TestConnectionRouteAllocs checks that routing a short-header packet
// allocates nothing, by QUIC-LB and by the learned table.
func TestConnectionRouteAllocs(t *testing.T) {
	for _, path := range connectionPaths {
		t.Run(path.name, func(t *testing.T) {
			r, fl, pkt := shortHeaderRoute(t, path.quicLB)
			if got := r.route(fl, pkt); got != r.h.Upstreams[1] {
				t.Fatalf("routed to %v, want %s", got, r.h.Upstreams[1].Dial)
			}
			if n := testing.AllocsPerRun(1000, func() { r.route(fl, pkt) }); n != 0 {
				t.Errorf("%v allocations per short-header packet, want 0", n)
			}
		})
	}
}

// BenchmarkConnectionRoute is the routing of one short-header packet: by
// QUIC-LB, by the learned table, and by `per flow` for comparison.
func BenchmarkConnectionRoute(b *testing.B) {
	for _, path := range connectionPaths {
		b.Run(path.name, func(b *testing.B) {
			r, fl, pkt := shortHeaderRoute(b, path.quicLB)
			b.ReportAllocs()
			for b.Loop() {
				r.route(fl, pkt)
			}
		})
	}
	b.Run("per_flow", func(b *testing.B) {
		r, fl := newConnectionRouter(b, false)
		pf := perFlowRouter{r.h}
		pkt := shortHeader(quicLBCID(b, 2))
		b.ReportAllocs()
		for b.Loop() {
			pf.route(fl, pkt)
		}
	})
}

// FuzzConnectionRoute routes arbitrary datagrams, and looks at them as
// replies: nothing panics, and every datagram goes to one of the handler's
// upstreams.
func FuzzConnectionRoute(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("not quic"))
	f.Add(longHeader(0, []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9}))
	f.Add(longHeader(2, []byte{9}, []byte{0xaa, 0xbb, 0xcc, 0xdd}))
	f.Add(longHeader(3, nil, []byte{0x11, 0x22, 0x33, 0x44}))
	f.Add(shortHeader([]byte{0xaa, 0xbb, 0xcc, 0xdd}))
	f.Add([]byte{0x80, 0, 0, 0, 0, 4, 1, 2, 3, 4, 0, 0, 0, 0, 1})
	f.Add([]byte{0xc0, 0, 0, 0, 1, 21})
	f.Add([]byte{0x40, 0x3f, 1, 2})
	r, fl := newConnectionRouter(f, true)
	f.Add(shortHeader(quicLBCID(f, 3)))
	f.Fuzz(func(t *testing.T, b []byte) {
		r.observeReply(fl, r.h.Upstreams[2], b)
		u := r.route(fl, b)
		if u == nil || r.h.byAddr[u.addr] != u {
			t.Fatalf("routed to %v", u)
		}
	})
}

// TestConnectionCIDTable checks the learned table's expiry and cap.
func TestConnectionCIDTable(t *testing.T) {
	tb := newCIDTable()
	addr := keyOf(netip.MustParseAddrPort("127.0.0.1:7001"))
	tb.learn([]byte{1, 2, 3, 4}, addr, time.Second, true)
	if got, ok := tb.shortLookup([]byte{0x40, 1, 2, 3, 4, 5}); !ok || got != addr {
		t.Fatalf("short lookup: %v, %v", got, ok)
	}
	tb.sweep(tb.now.Load() + int64(2*time.Second))
	if _, ok := tb.lookup([]byte{1, 2, 3, 4}); ok {
		t.Error("an entry idle past its TTL was kept")
	}
	for i := range maxConnectionIDs + 10 {
		tb.learn([]byte{byte(i >> 16), byte(i >> 8), byte(i), 0xff, 0xee}, addr, time.Minute, false)
	}
	if n := tb.len(); n != maxConnectionIDs {
		t.Errorf("%d entries, want the cap %d", n, maxConnectionIDs)
	}
}

// BenchmarkConnectionRoundTrip is BenchmarkRoundTrip with 1-RTT QUIC
// packets (64 octets, a QUIC-LB connection ID) on fastudp/: `per flow`,
// and `per connection` by QUIC-LB and by the learned table. cpu-ns/op is
// the CPU time of the whole process (client, balancer and upstream) per
// round trip.
func BenchmarkConnectionRoundTrip(b *testing.B) {
	for _, mode := range []string{"per_flow", "learned", "quic_lb"} {
		b.Run(mode, func(b *testing.B) {
			a, c := startRawUpstream(b, true, false), startRawUpstream(b, true, false)
			h := rawHandler(PerFlow, a, c)
			if mode != "per_flow" {
				h["per"] = PerConnection
			}
			if mode == "quic_lb" {
				h["quic_lb"] = quicLBJSON()
				h["upstreams"] = []any{
					map[string]any{"dial": a.dial(), "server_id": "0001"},
					map[string]any{"dial": c.dial(), "server_id": "0002"},
				}
			}
			lb := startBalancerOn(b, FastNetwork, false, 30*time.Second, h)
			cl := newClient(b, lb.addr)
			cid := quicLBCID(b, 2)
			if mode == "learned" {
				// The echo of a Handshake packet is a "reply" whose SCID
				// the balancer learns.
				if _, err := cl.conn.Write(longHeader(2, []byte{9}, cid)); err != nil {
					b.Fatal(err)
				}
				if _, err := cl.conn.Read(cl.buf); err != nil {
					b.Fatal(err)
				}
			}
			payload := append(shortHeader(cid), make([]byte, 64-1-len(cid)-32)...)
			for range 100 { // establish the flow
				if _, err := cl.conn.Write(payload); err != nil {
					b.Fatal(err)
				}
				if _, err := cl.conn.Read(cl.buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			defer processCPUPerOp(b)()
			for b.Loop() {
				if _, err := cl.conn.Write(payload); err != nil {
					b.Fatal(err)
				}
				if _, err := cl.conn.Read(cl.buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestBuildCommandConfigPerConnection checks that `caddy stabilize --per
// connection` writes the granularity into a config that validates.
func TestBuildCommandConfigPerConnection(t *testing.T) {
	opts := parseCommandArgs(t, "--listen", ":5000", "--to", "127.0.0.1:6001", "--per", "connection")
	if h := buildAndDecode(t, opts).Apps.Layer4.Servers["srv0"].Routes[0].Handle[0]; h.Per != PerConnection {
		t.Errorf("per = %q, want %q", h.Per, PerConnection)
	}
	raw, err := buildCommandConfig(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(mustConfig(t, raw)); err != nil {
		t.Errorf("the config does not validate: %v", err)
	}
}

func mustConfig(t *testing.T, raw []byte) *caddy.Config {
	t.Helper()
	cfg := new(caddy.Config)
	if err := json.Unmarshal(raw, cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestConnectionRouteKeyRotation routes connection IDs of two QUIC-LB
// configurations at once, as during a key rotation: the config rotation
// bits choose the configuration.
func TestConnectionRouteKeyRotation(t *testing.T) {
	r, fl := newConnectionRouter(t, true)
	next := quiclb.Config{ID: 2, ServerIDLen: 2, NonceLen: 10, Key: []byte("next rotation k!")}
	r.h.QUICLB = append(r.h.QUICLB, &QUICLBConfig{ConfigID: 2, ServerIDLength: 2, NonceLength: 10, Key: hex.EncodeToString(next.Key)})
	if err := r.h.provisionQUICLB(r); err != nil {
		t.Fatal(err)
	}
	for i, u := range r.h.Upstreams {
		g, err := quiclb.NewGenerator(next, []byte{0, byte(i + 1)})
		if err != nil {
			t.Fatal(err)
		}
		cid, err := g.GenerateConnectionID()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range [][]byte{quicLBCID(t, byte(i+1)), cid.Bytes()} {
			if got := r.route(fl, shortHeader(c)); got != u {
				t.Errorf("CID %x (config %d) routed to %v, want %s", c, quiclb.ConfigID(c[0]), got, u.Dial)
			}
		}
	}
}

// testFlow is a flow of client for h, with an idle timeout of a minute.
func testFlow(h *Handler, client netip.AddrPort) *Flow {
	fl := &Flow{h: h, client: client}
	fl.idleTimeout.Store(int64(time.Minute))
	if r, ok := h.router.(*perConnectionRouter); ok {
		fl.cids = r.table(fl.listener)
	}
	return fl
}

// TestConnectionRouteNewConnections: several QUIC connections from one
// client socket, one flow. A new connection's Initial goes where the policy
// picks, although its fresh DCID has the length of the servers' connection
// IDs; a long header of a known connection (the same client SCID) whose
// DCID the balancer has not seen, a server's ID from a NEW_CONNECTION_ID
// frame, goes to that connection's server, also while another connection
// of the socket is in its handshake; with the table full, to the flow's.
func TestConnectionRouteNewConnections(t *testing.T) {
	r, fl := newConnectionRouter(t, false)
	ups := r.h.Upstreams
	serverCID := func(u *Upstream, i int) []byte {
		return []byte{byte(slices.Index(ups, u)), byte(i), 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc}
	}
	initial := func(i int, scid []byte) []byte {
		return longHeader(0, []byte{0xd0, byte(i), 1, 2, 3, 4, 5, 6}, scid)
	}

	// Twelve connections, each answered by its server's Initial, which
	// teaches the balancer the servers' CID length, 8: round robin spreads
	// them evenly. Each connection's later Initials, to its server's CID
	// or to one from a NEW_CONNECTION_ID frame, stay on its server.
	picks := map[*Upstream]int{}
	for i := range 12 {
		scid := []byte{0x5c, byte(i), 0, 0}
		u := r.route(fl, initial(i, scid))
		picks[u]++
		r.observeReply(fl, u, longHeader(0, scid, serverCID(u, i)))
		announced := []byte{0xee, byte(i), 2, 3, 4, 5, 6, 7}
		for _, dcid := range [][]byte{serverCID(u, i), announced} {
			if got := r.route(fl, longHeader(0, dcid, scid)); got != u {
				t.Fatalf("connection %d: Initial to %x went to %s, not %s", i, dcid, upstreamName(got), u.Dial)
			}
		}
	}
	for _, u := range ups {
		if picks[u] != 4 {
			t.Errorf("12 new connections from one socket, round robin over 3 upstreams: %s got %d", u.Dial, picks[u])
		}
	}

	// Two connections in their handshakes at once: the Initial and
	// Handshake packets of each, to IDs the balancer has not seen, go to
	// its server.
	a, c := []byte{0x5c, 0xa0, 0, 0}, []byte{0x5c, 0xc0, 0, 0}
	ua := r.route(fl, initial(400, a))
	uc := r.route(fl, initial(401, c))
	if ua == uc {
		t.Fatalf("round robin sent two new connections to %s", ua.Dial)
	}
	for i, conn := range []struct {
		scid []byte
		u    *Upstream
	}{{a, ua}, {c, uc}, {a, ua}} {
		for _, typ := range []byte{0, 2} { // Initial, Handshake
			dcid := []byte{0xef, byte(i), typ, 3, 4, 5, 6, 7}
			if got := r.route(fl, longHeader(typ, dcid, conn.scid)); got != conn.u {
				t.Errorf("connection %x: type %d packet to %x went to %s, want %s", conn.scid, typ, dcid, upstreamName(got), conn.u.Dial)
			}
			if got := r.route(fl, shortHeader(dcid)); got != conn.u {
				t.Errorf("connection %x: short header to %x went to %s, want %s", conn.scid, dcid, upstreamName(got), conn.u.Dial)
			}
		}
	}

	// With the table full, the server's reply teaches nothing: the
	// connection's next Initial, to the server's CID, follows the flow.
	fillCIDTable(fl.cids, maxConnectionIDs, time.Minute)
	scid := []byte{0x5c, 0xfc, 0, 0}
	u := r.route(fl, initial(300, scid))
	r.observeReply(fl, u, longHeader(0, scid, serverCID(u, 300)))
	if got := r.route(fl, longHeader(0, serverCID(u, 300), scid)); got != u {
		t.Errorf("with the table full, the Initial to its server's CID went to %s, want the flow's %s", upstreamName(got), u.Dial)
	}
}

// upstreamName is u's dial address, or "none".
func upstreamName(u *Upstream) string {
	if u == nil {
		return "none"
	}
	return u.Dial
}

// initialServer is an upstream that answers each client Initial and
// Handshake packet as a QUIC server does, with one of the same type to the
// client's SCID from a connection ID of its own: 8 octets, its index and
// the first 7 of the client's DCID; and each short header packet with one
// that holds its index.
type initialServer struct {
	conn  *net.UDPConn
	index byte
}

func startInitialServer(t *testing.T, index byte) *initialServer {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	s := &initialServer{conn: conn, index: index}
	done := make(chan struct{})
	t.Cleanup(func() {
		_ = conn.Close()
		<-done
	})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if n > 0 && !quicwire.IsLongHeader(buf[:n]) {
				_, _ = conn.WriteToUDPAddrPort([]byte{0x40, index}, from)
				continue
			}
			hdr, err := quicwire.ParseLong(buf[:n])
			if err != nil || len(hdr.DCID) < 8 {
				continue
			}
			typ, err := hdr.Type()
			if err != nil || typ != quicwire.PacketTypeInitial && typ != quicwire.PacketTypeHandshake {
				continue
			}
			scid := append([]byte{index}, hdr.DCID[:7]...)
			_, _ = conn.WriteToUDPAddrPort(longHeader(buf[0]>>4&3, hdr.SCID, scid), from)
		}
	}()
	return s
}

// exchangeLongHeader sends c a long header of type typ and returns the index of the
// server that answered.
func exchangeLongHeader(t *testing.T, c *client, typ byte, dcid, scid []byte) byte {
	t.Helper()
	if _, err := c.conn.Write(longHeader(typ, dcid, scid)); err != nil {
		t.Fatal(err)
	}
	if err := c.conn.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := c.conn.Read(c.buf)
	if err != nil {
		t.Fatalf("connection %x: no reply to type %d: %v", scid, typ, err)
	}
	hdr, err := quicwire.ParseLong(c.buf[:n])
	if err != nil || !bytes.Equal(hdr.DCID, scid) || len(hdr.SCID) != 8 {
		t.Fatalf("connection %x: reply %x", scid, c.buf[:n])
	}
	return hdr.SCID[0]
}

// TestConnectionNewConnectionsOneSocket opens twelve QUIC connections
// (their Initials, answered by servers that choose 8-octet connection IDs)
// from one client socket through `per connection` with round robin: each
// server gets four, as from twelve sockets. Then two connections in their
// handshakes at once send Handshake packets to connection IDs the balancer
// has not seen: each reaches its own server.
func TestConnectionNewConnectionsOneSocket(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		var list []any
		for i := range 3 {
			s := startInitialServer(t, byte(i))
			list = append(list, map[string]any{"dial": "udp/" + s.conn.LocalAddr().String()})
		}
		lb := startBalancerOn(t, network, false, 30*time.Second, map[string]any{
			"handler": "stabilize", "upstreams": list, "per": PerConnection,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		})
		c := newClient(t, lb.addr)
		got := map[byte]int{}
		for i := range 12 {
			got[exchangeLongHeader(t, c, 0, []byte{0xd0, byte(i), 1, 2, 3, 4, 5, 6}, []byte{0x5c, byte(i), 0, 0})]++
		}
		for i := range byte(3) {
			if got[i] != 4 {
				t.Errorf("12 new connections from one socket, round robin over 3 servers: server %d got %d (%v)", i, got[i], got)
			}
		}

		a, b := []byte{0x5c, 0xa0, 0, 0}, []byte{0x5c, 0xb0, 0, 0}
		sa := exchangeLongHeader(t, c, 0, []byte{0xd0, 0xa0, 1, 2, 3, 4, 5, 6}, a)
		sb := exchangeLongHeader(t, c, 0, []byte{0xd0, 0xb0, 1, 2, 3, 4, 5, 6}, b)
		for i, conn := range []struct {
			scid   []byte
			server byte
		}{{a, sa}, {b, sb}, {a, sa}} {
			if got := exchangeLongHeader(t, c, 2, []byte{0xee, byte(i), 2, 3, 4, 5, 6, 7}, conn.scid); got != conn.server {
				t.Errorf("connection %x: a Handshake packet to a new ID reached server %d, not its server %d", conn.scid, got, conn.server)
			}
		}
	})
}
