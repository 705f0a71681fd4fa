package stabilize

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// udp/ upstreams behind QUIC termination: each client stream is one request
// datagram. These tests cover their health, reloads and sockets.

// quicUDPPers are the granularities of udp/ upstreams behind QUIC
// termination: per packet picks for each request, per flow once per
// connection.
var quicUDPPers = []string{PerPacket, PerFlow}

// TestQUICUDPPassiveFailures: a udp/ request that gets no reply within the
// passive checks' reply_timeout, or draws an ICMP port unreachable, is a
// passive failure, which marks its upstream down: the connection's later
// requests go to the healthy upstream, per packet and per flow alike.
func TestQUICUDPPassiveFailures(t *testing.T) {
	forPaths(t, quicUDPPers, func(t *testing.T, network, per string) {
		for _, fault := range []string{"silent", "closed"} {
			t.Run(fault, func(t *testing.T) {
				dead, good := startUpstream(t, "dead"), startUpstream(t, "good")
				passive := map[string]any{"max_fails": 1, "fail_duration": "1m"}
				switch fault {
				case "silent":
					dead.silent.Store(true)
					passive["reply_timeout"] = "100ms"
				case "closed":
					dead.close() // its port answers with ICMP port unreachable
				}
				// "first": the first request of the connection goes to dead.
				h := quicHandler(t, per, "first", map[string]any{"reply_timeout": "1s"}, dead.dial(), good.dial())
				h["health_checks"] = map[string]any{"passive": passive}
				lb := startBalancerOn(t, network, false, 30*time.Second, h)
				c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
				got := map[string]int{}
				for i := range 6 {
					name := "failed"
					if reply, err := quicExchange(c, []byte{byte('a' + i)}); err == nil {
						name, _, _ = cutName(reply)
					}
					got[name]++
				}
				if got["good"] != 5 || got["failed"] != 1 {
					t.Fatalf("6 requests, the first to the %s upstream: %v, want one failure and 5 to good", fault, got)
				}
				if hostOf(t, dead.addr).Healthy() {
					t.Fatalf("the %s upstream is not marked down", fault)
				}
			})
		}
	})
}

// cutName splits a test upstream's reply "<name>|<data>".
func cutName(reply []byte) (name string, data []byte, ok bool) {
	for i, b := range reply {
		if b == '|' {
			return string(reply[:i]), reply[i+1:], true
		}
	}
	return "", nil, false
}

// TestQUICUDPPerFlowMovesOffDownUpstream: per flow, a connection whose
// udp/ upstream an active check marks down sends its next requests to a
// healthy upstream, as a per flow flow moves. Two failed probes of 250 ms
// mark an upstream down: one slow probe under load does not.
func TestQUICUDPPerFlowMovesOffDownUpstream(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		h := quicHandler(t, PerFlow, "first", map[string]any{"reply_timeout": "300ms"}, a.dial(), b.dial())
		h["health_checks"] = map[string]any{"active": map[string]any{
			"send": "ping", "expect": `\|ping$`, "interval": "300ms", "timeout": "250ms", "fails": 2,
		}}
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		eventually(t, 3*time.Second, "both upstreams up", func() bool {
			return hostOf(t, a.addr).Healthy() && hostOf(t, b.addr).Healthy()
		})
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		if name := mustExchange(t, c, []byte("one")); name != "a" {
			t.Fatalf("the first request went to %s, want a", name)
		}
		a.silent.Store(true)
		eventually(t, 5*time.Second, "a marked down", func() bool { return !hostOf(t, a.addr).Healthy() })
		for i := range 3 {
			reply, err := quicExchange(c, []byte(fmt.Sprint("after ", i)))
			if name, _, _ := cutName(reply); err != nil || name != "b" {
				t.Fatalf("request %d after a went down: %q, %v; want b's reply", i, reply, err)
			}
		}
		if n := hostOf(t, a.addr).QUICConns(); n != 0 {
			t.Fatalf("a still counts %d QUIC connections", n)
		}
		if n := hostOf(t, b.addr).QUICConns(); n != 1 {
			t.Fatalf("b counts %d QUIC connections, want 1", n)
		}
	})
}

// TestQUICUDPReloadRemovesUpstream: after a reload that removes a udp/
// upstream, an open connection's requests and DATAGRAM frames go to the
// new config's upstreams, per packet and per flow; a reload to quic/
// upstreams closes it with QUICErrNoUpstream.
func TestQUICUDPReloadRemovesUpstream(t *testing.T) {
	forPaths(t, quicUDPPers, func(t *testing.T, network, per string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, per, "first", nil, a.dial(), b.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		if name := mustExchange(t, c, []byte("before")); name != "a" {
			t.Fatalf("before the reload: to %s, want a", name)
		}
		hostA := hostOf(t, a.addr) // leaves the pool with the old config
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, per, "first", nil, b.dial())), true); err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		for i := range 5 {
			got[mustExchange(t, c, []byte{byte('0' + i)})]++
		}
		if got["b"] != 5 {
			t.Fatalf("after a reload that removed a, the open connection's requests: %v, want all to b", got)
		}
		if reply := datagramExchange(t, c, "datagram"); reply != "b|datagram" {
			t.Fatalf("a DATAGRAM frame after the reload: reply %q, want b's", reply)
		}
		if n := hostA.QUICConns(); n != 0 {
			t.Fatalf("the removed upstream still counts %d QUIC connections", n)
		}

		qb := startQUICBackend(t, "q")
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "", nil, qb.dial())), true); err != nil {
			t.Fatal(err)
		}
		_, _ = quicExchange(c, []byte("to quic/"))
		waitClosedWith(t, c, 5*time.Second, QUICErrNoUpstream)
		if name := mustExchange(t, dialQUIC(t, lb.addr, nil, quicClientTLS(t)), []byte("new")); name != "q" {
			t.Fatalf("a new connection went to %s", name)
		}
	})
}

// TestQUICUDPLocalAddress: requests and DATAGRAM frames to udp/ upstreams
// leave from local_addresses, one per connection, in turn, per packet and
// per flow.
func TestQUICUDPLocalAddress(t *testing.T) {
	forPaths(t, quicUDPPers, func(t *testing.T, network, per string) {
		u := startUpstream(t, "a")
		h := quicHandler(t, per, "", nil, u.dial())
		locals := []string{"127.0.0.2", "127.0.0.3"}
		h["local_addresses"] = locals
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		for i := range 2 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			for j := range 2 {
				mustExchange(t, c, []byte(fmt.Sprint("request ", i, j)))
			}
			if reply := datagramExchange(t, c, "datagram"); reply != "a|datagram" {
				t.Fatalf("DATAGRAM frame: reply %q", reply)
			}
		}
		u.mu.Lock()
		defer u.mu.Unlock()
		srcs := map[string]int{}
		for src, n := range u.sources {
			srcs[src.Addr().String()] += n
		}
		if len(srcs) != 2 || srcs[locals[0]] < 3 || srcs[locals[1]] < 3 {
			t.Fatalf("datagrams by source address: %v, want 3 or more from each of %v, none from elsewhere", srcs, locals)
		}
	})
}

// TestQUICUDPDatagramReload: DATAGRAM frames follow reloads as requests
// do: from IPv6-only udp/ upstreams to an IPv4 one, then to
// local_addresses, an open connection's frames reach the new config's
// upstream, from its local address, per packet and per flow.
func TestQUICUDPDatagramReload(t *testing.T) {
	forPaths(t, quicUDPPers, func(t *testing.T, network, per string) {
		a4, b6 := startUpstream(t, "a4"), startUpstreamAt(t, "b6", "[::1]:0")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, per, "", nil, b6.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		if reply := datagramExchange(t, c, "before"); reply != "b6|before" {
			t.Fatalf("a DATAGRAM frame before the reload: reply %q, want b6's", reply)
		}
		reload := func(h map[string]any) {
			t.Helper()
			if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, h), true); err != nil {
				t.Fatal(err)
			}
		}
		reload(quicHandler(t, per, "", nil, a4.dial()))
		if name := mustExchange(t, c, []byte("request")); name != "a4" {
			t.Fatalf("a request after the reload to IPv4 went to %s, want a4", name)
		}
		if reply := datagramExchange(t, c, "after"); reply != "a4|after" {
			t.Fatalf("a DATAGRAM frame after the reload to IPv4: reply %q, want a4's", reply)
		}
		h := quicHandler(t, per, "", nil, a4.dial())
		h["local_addresses"] = []string{"127.0.0.3"}
		reload(h)
		if reply := datagramExchange(t, c, "local"); reply != "a4|local" {
			t.Fatalf("a DATAGRAM frame after the reload to local_addresses: reply %q, want a4's", reply)
		}
		a4.mu.Lock()
		defer a4.mu.Unlock()
		for src := range a4.sources {
			if src.Addr().String() == "127.0.0.3" {
				return
			}
		}
		t.Fatalf("a4's sources %v: none is the new local address 127.0.0.3", a4.sources)
	})
}
