package stabilize

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/mholt/caddy-l4/modules/l4subroute" // a handler inside a subroute
)

// listenersConfig is a Caddy config with one layer4 server per address
// in addrs, on network, each with a one-second idle timeout and routing
// to handler, with the admin API at admin.
func listenersConfig(network, admin string, handler any, addrs ...string) []byte {
	servers := map[string]any{}
	for i, a := range addrs {
		servers[fmt.Sprint("s", i)] = map[string]any{
			"listen":       []string{network + "/" + a},
			"idle_timeout": "1s",
			"routes":       []any{map[string]any{"handle": []any{handler}}},
		}
	}
	cfg := map[string]any{
		"admin":   map[string]any{"listen": admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps":    map[string]any{"layer4": map[string]any{"servers": servers}},
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return out
}

// setListeners is the listeners of the set's tables.
func setListeners(s *cidTableSet) map[netip.AddrPort]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[netip.AddrPort]bool)
	for l := range s.tables {
		m[l] = true
	}
	return m
}

// janitors counts the goroutines running a cidTableSet's janitor.
func janitors() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "(*cidTableSet).janitor")
}

// TestConnectionTablesListenerSetReload: a reload that removes a listener
// leaves that listener's table until its entries expire, then drops it;
// the remaining listener keeps its table; after caddy.Stop the identity's
// set is gone from the pool and its janitor has ended.
func TestConnectionTablesListenerSetReload(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		before := janitors()
		tr := trackHandlers(t)
		var list []any
		for i := range 2 {
			s := startInitialServer(t, byte(i))
			list = append(list, map[string]any{"dial": "udp/" + s.conn.LocalAddr().String()})
		}
		handler := map[string]any{
			"handler": "stabilize", "upstreams": list, "per": PerConnection,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
		a, b, c := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		admin := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
		if err := caddy.Load(listenersConfig(network, admin, handler, a, b), true); err != nil {
			t.Fatal(err)
		}
		stopped := false
		t.Cleanup(func() {
			if !stopped {
				_ = caddy.Stop()
			}
		})
		for i, l := range []string{a, b} {
			exchangeLongHeader(t, newClient(t, l), 0, []byte{0xf1, byte(i), 2, 3, 4, 5, 6, 7}, []byte{0x5a, byte(i), 0, 0})
		}
		h := tr.latest()
		identity := h.identity
		set := h.router.(*perConnectionRouter).tables
		la, lb, lc := netip.MustParseAddrPort(a), netip.MustParseAddrPort(b), netip.MustParseAddrPort(c)
		if got := setListeners(set); !got[la] || !got[lb] {
			t.Fatalf("tables of %v, want %v and %v", got, la, lb)
		}

		// B removed, C added.
		if err := caddy.Load(listenersConfig(network, admin, handler, a, c), true); err != nil {
			t.Fatal(err)
		}
		if h2 := tr.latest(); h2.router.(*perConnectionRouter).tables != set {
			t.Fatal("the reload replaced the identity's set")
		}
		exchangeLongHeader(t, newClient(t, c), 0, []byte{0xf2, 1, 2, 3, 4, 5, 6, 7}, []byte{0x5c, 0, 0, 0})
		eventually(t, 5*time.Second, "the removed listener's table dropped once its entries expired", func() bool {
			got := setListeners(set)
			return !got[lb] && got[lc]
		})

		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		stopped = true
		if n, ok := cidTables.References(identity); ok {
			t.Errorf("after caddy.Stop the set of %q has %d references", identity, n)
		}
		eventually(t, 3*time.Second, "the set's janitor ended", func() bool { return janitors() <= before })
	})
}

// withName sets the name of h, a handler config, and returns it.
func withName(name string, h map[string]any) map[string]any {
	h["name"] = name
	return h
}

// named returns the newest live handler provisioned with name.
func (tr *handlerTracker) named(name string) *Handler {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, w := range slices.Backward(tr.hs) {
		if h := w.Value(); h != nil && h.Name == name {
			return h
		}
	}
	return nil
}

// flowsOf is the number of h's flows.
func flowsOf(h *Handler) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.flows)
}

// TestReloadListenerReassigned: a reload gives listener L a handler of a
// new identity (another policy, another upstream) and moves L's old
// handler's identity to a new listener M. A client's flow on L that was
// open before the reload follows L's new route: it does not go on through
// the handler of M, which the new config never routes L to, and it leaves
// no flow behind, in M's handler or in the old one. On fastudp/ the old
// flow's successor by identity serves M only, so the flow ends and the
// client's next datagram goes through caddy-l4's dispatch on L; on udp/
// caddy-l4 dispatches it anyway.
func TestReloadListenerReassigned(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		x, y := startUpstream(t, "x"), startUpstream(t, "y")
		l := startServers(t, network, "", handlerConfig(per, "", x))[0]
		m := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		old := tr.latest()
		c := newClient(t, l)
		if got := c.mustRoundTrip("before"); got != "x" {
			t.Fatalf("before the reload: reached %q, want x", got)
		}
		loadTwoListeners(t, network, l, withName("l", handlerConfig(per, "random", y)), m, withName("m", handlerConfig(per, "", x)))
		if got := c.mustRoundTrip("after"); got != "y" {
			t.Fatalf("after the reload: the flow on %s reached %q through the handler of %s, want y, its listener's new route", l, got, m)
		}
		if n := flowsOf(tr.named("m")); n != 0 {
			t.Errorf("the handler of %s has %d flows, want none", m, n)
		}
		if n := flowsOf(tr.named("l")); n != 1 {
			t.Errorf("the handler of %s has %d flows, want 1", l, n)
		}
		eventually(t, 2*time.Second, "the old handler's flow to end", func() bool { return flowsOf(old) == 0 })
		if network == FastNetwork {
			if n := fastSocketAt(t, l).Endpoints(); n != 1 {
				t.Errorf("the fastudp socket of %s has %d endpoints, want 1", l, n)
			}
		}
	})
}

// TestReloadListenerKeepsItsLineage: a reload keeps listener L's handler
// identity and adds a listener M with a handler of the same identity that
// shares more of the old handler's upstreams than L's new one. A fastudp/
// flow on L moves to L's new handler, the one caddy-l4 routes L to, keeping
// its upstream-facing socket; not to M's. On udp/ the flow ends and
// caddy-l4 hands the client's next datagram to L's new handler.
func TestReloadListenerKeepsItsLineage(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		x, y := startUpstream(t, "x"), startUpstream(t, "y")
		l := startServers(t, network, "", handlerConfig(per, "first", x, y))[0]
		m := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		c := newClient(t, l)
		if got := c.mustRoundTrip("before"); got != "x" {
			t.Fatalf("before the reload: reached %q, want x", got)
		}
		loadTwoListeners(t, network, l, withName("l", handlerConfig(per, "first", x)), m, withName("m", handlerConfig(per, "first", x, y)))
		if got := c.mustRoundTrip("after"); got != "x" {
			t.Fatalf("after the reload: reached %q, want x", got)
		}
		if n := flowsOf(tr.named("m")); n != 0 {
			t.Errorf("the handler of %s has %d flows, want none", m, n)
		}
		if n := flowsOf(tr.named("l")); n != 1 {
			t.Errorf("the handler of %s has %d flows, want 1", l, n)
		}
		x.mu.Lock()
		sources := len(x.sources)
		x.mu.Unlock()
		if network == FastNetwork && sources != 1 {
			t.Errorf("x saw the flow from %d sockets, want 1: the flow kept its socket", sources)
		}
	})
}

// TestHandlerServesItsServersListeners: a handler learns, as it is
// provisioned, the listen addresses of the layer4 server whose routes hold
// it, also inside a subroute, and serves only those: what a reload's
// Cleanup asks of a successor (see reload.go's serverListens, which reads
// caddy-l4 v0.1.2's unexported Server fields), with the placeholders in
// its listen addresses replaced, as caddy-l4 does.
func TestHandlerServesItsServersListeners(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		x := startUpstream(t, "x")
		var ls []string
		for range 3 {
			ls = append(ls, fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)))
		}
		t.Setenv("STABILIZE_TEST_LISTEN_PORT", strings.TrimPrefix(ls[2], "127.0.0.1:"))
		subroute := map[string]any{
			"handler": "subroute",
			"routes":  []any{map[string]any{"handle": []any{withName("a", handlerConfig(PerFlow, "", x))}}},
		}
		servers := map[string]any{
			"one": map[string]any{
				"listen": []string{network + "/" + ls[0], network + "/" + ls[1]},
				"routes": []any{map[string]any{"handle": []any{subroute}}},
			},
			"two": map[string]any{
				"listen": []string{network + "/127.0.0.1:{env.STABILIZE_TEST_LISTEN_PORT}"},
				"routes": []any{map[string]any{"handle": []any{withName("b", handlerConfig(PerFlow, "", x))}}},
			},
		}
		cfg, err := json.Marshal(map[string]any{
			"admin": map[string]any{"disabled": true},
			"apps":  map[string]any{"layer4": map[string]any{"servers": servers}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = caddy.Stop() })
		for name, want := range map[string][]bool{"a": {true, true, false}, "b": {false, false, true}} {
			h := tr.named(name)
			if !h.listensKnown {
				t.Fatalf("handler %s does not know its server's listeners", name)
			}
			for i, l := range ls {
				if got := h.serves(network, netip.MustParseAddrPort(l)); got != want[i] {
					t.Errorf("handler %s serves %s: %v, want %v", name, l, got, want[i])
				}
			}
		}
	})
}
